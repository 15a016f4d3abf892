"""A trained toy model as an activation source: h = W x (or ReLU(W x)) on fresh sparse features.

The toy model's feature directions W_i (its represented features, ‖W_i‖ > 0.5, normalised) are the
ground truth an SAE on h should recover (Sharkey, Braun & Millidge 2022; ARENA 1.3.1).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sae.data.generated import block_chunks, block_rows
from sae.data.sources import (
    BATCH_SOURCES,
    ROW_SOURCES,
    BatchSourceEntry,
    Chunk,
    DataConfig,
    RowSourceEntry,
    source_keys,
)
from sae.errors import DataError, require
from toy_models import analysis, models
from toy_models.train import Task


@dataclasses.dataclass
class ToyRunConfig(DataConfig):
    """`data=toy`: hidden activations of a trained toy model (a `toy-train` run directory)."""

    name: str = "toy"
    run: str = "???"  # the toy-train output directory (results.npz + metrics.json)
    setting: int | None = None  # which setting's best model; toy-sae trains one SAE per setting when None

    def check(self) -> None:
        super().check()
        require(self.setting is None or self.setting >= 0, f"data.setting={self.setting} must be ≥ 0")


@dataclasses.dataclass
class ToyRowsConfig:
    """`source=toy` (sae-cache): hidden activations of one setting of a toy model."""

    name: str = "toy"
    run: str = "???"  # the toy-train output directory
    setting: int = 0  # which setting's model
    n_rows: int = 1_000_000

    def check(self) -> None:
        require(self.n_rows > 0, f"source.n_rows={self.n_rows} must be > 0")
        require(self.setting >= 0, f"source.setting={self.setting} must be ≥ 0")


def load_toy_run(run: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of results.npz and the config recorded in metrics.json of a toy-train run directory."""
    run = Path(run)
    results, metrics = run / "results.npz", run / "metrics.json"
    for path in (results, metrics):
        if not path.is_file():
            raise DataError(f"data.run='{run}': no {path.name} there (expected a toy-train output directory)")
    try:
        with np.load(results) as npz:
            arrays = dict(npz)
        config = json.loads(metrics.read_text())["config"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"data.run='{run}': unreadable toy-train output ({err})") from err
    return arrays, config


class ToyBatches:
    """`data=toy`: batches of a toy model's hidden activations for one setting: [batch, m]."""

    process_local = False

    def __init__(self, cfg: ToyRunConfig, batch_size: int, seed: int):
        arrays, config = load_toy_run(cfg.run)
        n_settings = len(arrays["feature_probability"])
        if cfg.setting is None or not 0 <= cfg.setting < n_settings:
            raise DataError(f"data.setting={cfg.setting}: pick one of 0..{n_settings - 1} of the toy run '{cfg.run}'")
        model, data = config["model"], config["data"]
        self.kind = model["kind"]
        self.params = {
            name: jnp.asarray(arrays[name][cfg.setting : cfg.setting + 1])
            for name in ("W", "W1", "W2", "b")
            if name in arrays
        }
        self.feature_probability = jnp.asarray(arrays["feature_probability"][cfg.setting : cfg.setting + 1])
        self.task = Task(
            self.kind,
            model["n_features"],
            model["n_hidden"],
            0,
            data["correlated_pairs"],
            data["anticorrelated_pairs"],
            data["rng"],
        )
        W = np.asarray(models.feature_directions(self.params)[0])  # [m, n]
        kept = analysis.represented(W)
        self.ground_truth = jnp.asarray((W[:, kept] / analysis.feature_norms(W)[kept]).T)  # [n_represented, m]
        self.d_in = model["n_hidden"]
        self.eval_tokens = cfg.eval_tokens
        self._seed = seed
        self._hidden = jax.jit(self._hidden_batch, static_argnums=(1,))

    def _hidden_batch(self, stream: jax.Array, batch_size: int, step: jax.Array) -> jax.Array:
        task = dataclasses.replace(self.task, batch_size=batch_size)
        x = task.batch(stream, step, self.feature_probability)  # [1, n, batch]
        return models.hidden(self.params, x, self.kind)[0].T  # [batch, m]

    @staticmethod
    def _stream(purpose: int, seed: int) -> jax.Array:
        """Distinct random streams for training, evaluation and samples (none is the toy model's own)."""
        return jnp.uint32((seed * 3 + purpose + 1) * 0x9E3779B1 % 2**32)

    def sample(self, n: int, seed: int) -> jax.Array:
        return self._hidden(self._stream(2, seed), n, jnp.uint32(0))

    def block(self, index: int, batch_size: int, seed: int) -> jax.Array:
        """Block `index` of the caching stream of `seed` (sae-cache): [batch_size, m], a function of its arguments."""
        return self._hidden(self._stream(3, seed), batch_size, jnp.uint32(index))

    def train_batches(self, batch_size: int, n_batches: int, seed: int, start_batch: int = 0) -> Iterator[jax.Array]:
        """Batches start_batch .. n_batches − 1 of the seed's stream (a resumed run starts past 0)."""
        stream = self._stream(0, seed)
        for i in range(start_batch, n_batches):
            yield self._hidden(stream, batch_size, jnp.uint32(i))

    def eval_batches(self, batch_size: int) -> Iterator[jax.Array]:
        stream = self._stream(1, self._seed)
        for i in range(-(-self.eval_tokens // batch_size)):
            yield self._hidden(stream, batch_size, jnp.uint32(i))


class ToyRows:
    """`source=toy`: n_rows hidden activations of one setting of a trained toy model; ground truth: its
    represented features."""

    with_tokens = False
    resume_unit = 1

    def __init__(self, cfg: ToyRowsConfig, chunk_rows: int, seed: int):
        self.toy = source_keys(ToyBatches, ToyRunConfig(run=cfg.run, setting=cfg.setting), 0, seed)
        self.seed, self.d_in, self.n_rows = seed, self.toy.d_in, cfg.n_rows
        self.block_rows = block_rows(max(self.toy.task.n_features, self.d_in))
        config = {"run": str(Path(cfg.run).expanduser().absolute()), "setting": cfg.setting, "n_rows": cfg.n_rows}
        self.provenance = {"source": "toy", "config": config, "block_rows": self.block_rows, "seed": seed}

    @property
    def ground_truth(self) -> np.ndarray:
        """[n_represented, d_in] unit feature directions."""
        return np.asarray(self.toy.ground_truth, np.float32)

    def block(self, index: int) -> jax.Array:
        return self.toy.block(index, self.block_rows, self.seed)

    def chunks(self, start: int) -> Iterator[Chunk]:
        return block_chunks(self.block, self.block_rows, self.n_rows, start)

    def files(self) -> dict[str, str]:
        return {}


BATCH_SOURCES.register("toy", BatchSourceEntry(ToyRunConfig, ToyBatches))
ROW_SOURCES.register("toy", RowSourceEntry(ToyRowsConfig, ToyRows))
