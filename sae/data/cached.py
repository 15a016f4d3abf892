"""Training batches from an activation store (`data=cached data.path=DIR`).

The last `eval_tokens` rows (at most a tenth of the store) are held out for the final evaluation; the
rest stream through `StoreLoader`, shuffled across shards, each process of a multi-host run reading
its own part. A store cached from ground-truth data (synthetic or a toy model) carries its true feature
directions, so the run reports recovery as it does on built-in synthetic data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from sae.data.loader import StoreLoader
from sae.data.sources import BATCH_SOURCES, BatchSourceEntry, DataConfig
from sae.data.store import Store, StoreError
from sae.errors import positive


@dataclasses.dataclass
class CachedConfig(DataConfig):
    """`data=cached`: an activation store written by sae-cache (sae/data/store.py)."""

    name: str = "cached"
    path: str = "???"  # the store directory (manifest.json + shards)
    mixing_rows: int = 1_048_576  # rows shuffled together (a window of whole shards; two windows are held in memory)
    verify: bool = True  # check each shard's checksum as it is loaded
    check_finite: bool = False  # also scan each loaded shard for NaN/Inf rows (sae-cache already refused them)

    def check(self) -> None:
        super().check()
        positive(self.mixing_rows, "data.mixing_rows")


class StoreBatches:
    """`data=cached`: batches shuffled from a store, and its held-out tail."""

    process_local = True  # each process reads its own shards (train_batches yields its rows only)

    def __init__(self, cfg: CachedConfig, batch_size: int, seed: int = 0):
        self.cfg = cfg
        self.store = Store(cfg.path)
        self.d_in = self.store.d_in
        self.n_eval = min(cfg.eval_tokens, self.store.n_rows // 10)
        self.n_train = self.store.n_rows - self.n_eval
        if self.n_eval == 0 or self.n_train < batch_size:
            raise StoreError(
                f"data.path='{cfg.path}': {self.store.n_rows} rows is too few for "
                f"trainer.batch_size={batch_size} plus a held-out tenth for evaluation"
            )
        truth = self.store.provenance.get("ground_truth")
        self.ground_truth = jax.device_put(np.load(self.store.path / truth)) if truth else None

    def sample(self, n: int, seed: int) -> jax.Array:
        """n random training rows (for the geometric-median initialisation): [n, d_in] float32."""
        rows = np.sort(np.random.default_rng(seed).choice(self.n_train, size=min(n, self.n_train), replace=False))
        return jax.device_put(self.store.take(rows).astype(np.float32))

    def train_batches(self, batch_size: int, n_batches: int, seed: int, start_batch: int = 0) -> Iterator[jax.Array]:
        """Batches start_batch .. n_batches − 1 of the seed's stream (a resumed run starts past 0)."""
        with StoreLoader(
            self.store,
            batch_size,
            seed,
            self.cfg.mixing_rows,
            rows=(0, self.n_train),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_batch=start_batch,
            verify=self.cfg.verify,
            check_finite=self.cfg.check_finite,
        ) as loader:
            for _, batch in zip(range(n_batches - start_batch), loader):
                yield jax.device_put(batch)

    def eval_batches(self, batch_size: int) -> Iterator[jax.Array]:
        for start in range(self.n_train, self.store.n_rows, batch_size):
            yield jax.device_put(self.store.read_rows(start, min(start + batch_size, self.store.n_rows)))


BATCH_SOURCES.register("cached", BatchSourceEntry(CachedConfig, StoreBatches))
