"""Training batches from an activation store (`data=cached data.path=DIR`).

The last `eval_tokens` rows (at most a tenth of the store) are held out for the final evaluation; the
rest stream through `StoreLoader`, shuffled across shards, each process of a multi-host run reading
its own part. A store cached from ground-truth data (synthetic or a toy model) carries its true feature
directions, so the run reports recovery as it does on built-in synthetic data.

Pairs for transcoders: with `data.target=STORE` (a second store of the same rows, cached in the same
sae-cache run at a later site) batches are (x [B, d_in], y [B, d_out]); with `data.layers=all|[l, …]`,
data.path is a multi-site cache directory and batches are (x [B, L, d_in], y [B, L, d_out]) from the stores
`blocks.<l>.<data.input_site>` and `blocks.<l>.<data.output_site>`. Either way every store's rows come from
one permutation (a `JoinedStore`, sae/data/loader.py), and the stores are checked on opening to hold the
same rows: the same row count, shard layout, dtype, and token ids and positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sae.data.loader import JoinedStore, StoreLoader
from sae.data.sources import BATCH_SOURCES, Batch, BatchSourceEntry, DataConfig
from sae.data.store import Store, StoreError
from sae.errors import positive, require
from sae.models.base import SITE_NAMES


@dataclasses.dataclass
class CachedConfig(DataConfig):
    """`data=cached`: an activation store written by sae-cache (sae/data/store.py)."""

    name: str = "cached"
    path: str = "???"  # the store directory (manifest.json + shards)
    mixing_rows: int = 1_048_576  # rows shuffled together (a window of whole shards; two windows are held in memory)
    verify: bool = True  # check each shard's checksum as it is loaded
    check_finite: bool = False  # also scan each loaded shard for NaN/Inf rows (sae-cache already refused them)
    target: str | None = None  # a transcoder's target: a store of the same rows at a later site (batches (x, y))
    layers: Any = None  # null, all, or [layer, …]: data.path is a multi-site cache; pairs of every listed layer
    input_site: str = "ln2.hook_normalized"  # with data.layers: the site each layer's input is read at
    output_site: str = "hook_mlp_out"  # with data.layers: the later site each layer's target is read at

    def check(self) -> None:
        super().check()
        positive(self.mixing_rows, "data.mixing_rows")
        self.check_pairs()

    def check_pairs(self) -> None:
        """data.target / data.layers and the sites (ConfigError naming the field)."""
        require(
            self.target is None or self.layers is None,
            f"data.target={self.target!r} and data.layers={self.layers!r}: pick one (data.target=STORE for a "
            "transcoder on one pair of stores, data.layers for a cross-layer one on a multi-site cache)",
        )
        if self.layers is None:
            return
        usage = f"data.layers={self.layers!r} must be null, all, or a list of distinct layer indices ≥ 0 (e.g. [0,1])"
        if isinstance(self.layers, str):
            require(self.layers == "all", usage)
        else:
            require(isinstance(self.layers, Sequence), usage)  # a list (OmegaConf's ListConfig is one too)
            layers = list(self.layers)
            require(
                bool(layers)
                and all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in layers)
                and len(set(layers)) == len(layers),
                usage,
            )
        for key, site in (("data.input_site", self.input_site), ("data.output_site", self.output_site)):
            require(site in SITE_NAMES, f"{key}={site!r} is not a site of a block: one of {', '.join(SITE_NAMES)}")
        require(
            SITE_NAMES.index(self.output_site) > SITE_NAMES.index(self.input_site),
            f"data.output_site={self.output_site!r} does not come after data.input_site={self.input_site!r} in a "
            "block; a transcoder predicts a later site from an earlier one",
        )

    def layer_list(self) -> list[int]:
        """The layers data.layers names, in increasing order; "all": 0 .. the last l whose two stores exist
        under data.path (without a gap). StoreError naming a missing store directory."""
        root = Path(self.path).absolute()

        def dirs(layer: int) -> tuple[Path, Path]:
            return root / f"blocks.{layer}.{self.input_site}", root / f"blocks.{layer}.{self.output_site}"

        if self.layers == "all":
            layers: list[int] = []
            while all(d.is_dir() for d in dirs(len(layers))):
                layers.append(len(layers))
            if not layers:
                missing = next(d for d in dirs(0) if not d.is_dir())
                raise StoreError(
                    f"data.layers=all: '{missing}' is missing; data.path='{root}' must be a multi-site cache "
                    f"(sae-cache 'source.sites=[blocks.0.{self.input_site},blocks.0.{self.output_site},…]')"
                )
            return layers
        layers = sorted(int(layer) for layer in self.layers)
        for layer in layers:
            for d in dirs(layer):
                if not d.is_dir():
                    raise StoreError(
                        f"data.layers={layers}: layer {layer}'s store '{d}' is missing (cache its site with sae-cache)"
                    )
        return layers


def _hook_name(store: Store) -> str:
    """The store's site: its provenance's hook_name, else its directory's name."""
    return str(store.provenance.get("hook_name") or store.path.name)


def _site_key(hook_name: str) -> tuple[int, int] | None:
    """(layer, index in SITE_NAMES) of 'blocks.<l>.<site>'; None for any other name."""
    block, _, site = hook_name.partition(".")
    layer, _, site = site.partition(".")
    if block != "blocks" or not layer.isdigit() or site not in SITE_NAMES:
        return None
    return int(layer), SITE_NAMES.index(site)


def check_same_rows(stores: list[tuple[str, Store]]) -> None:
    """StoreError unless every store holds the rows of the first: the same row count, shard layout, dtype and
    (where both carry them) token ids and positions. stores: (how a message names it, the store)."""
    (ref_name, ref), rest = stores[0], stores[1:]
    fix = "cache both sites in one sae-cache run ('source.sites=[…]')"
    for name, other in rest:
        if other.n_rows != ref.n_rows:
            raise StoreError(
                f"{name} has {other.n_rows} rows but {ref_name} has {ref.n_rows}; pairs need the same rows: {fix}"
            )
    for name, other in rest:
        for i in range(max(len(ref.shards), len(other.shards))):
            ours = tuple(int(v) for v in ref.offsets[i : i + 2]) if i < len(ref.shards) else None
            theirs = tuple(int(v) for v in other.offsets[i : i + 2]) if i < len(other.shards) else None
            if ours != theirs:
                where = (
                    f"'{other.path / other.shards[i].file}' holds rows [{theirs[0]}, {theirs[1]})"
                    if theirs
                    else f"has no shard {i}"
                )
                held = f"rows [{ours[0]}, {ours[1]})" if ours else "nothing (it has fewer shards)"
                raise StoreError(
                    f"{name}: shard {i} {where}, but shard {i} of {ref_name} holds {held}; pairs need the same "
                    f"shard layout: {fix}"
                )
    for name, other in rest:
        if other.dtype_name != ref.dtype_name:
            raise StoreError(
                f"{name} holds {other.dtype_name} but {ref_name} holds {ref.dtype_name}; pairs need one dtype: {fix}"
            )
    for name, other in rest:
        if not (ref.with_tokens and other.with_tokens):
            continue
        for i, (lo, hi) in enumerate(zip(ref.offsets[:-1], ref.offsets[1:])):
            (ta, pa), (tb, pb) = ref.read_tokens(int(lo), int(hi)), other.read_tokens(int(lo), int(hi))
            differ = (ta != tb) | (pa != pb)
            if differ.any():
                r = int(np.flatnonzero(differ)[0])
                kind = "token id" if ta[r] != tb[r] else "position"
                raise StoreError(
                    f"'{other.path / other.shards[i].file}' row {r} (row {int(lo) + r} of {name}) has {kind} "
                    f"{int((tb if kind == 'token id' else pb)[r])} but {ref_name} has "
                    f"{int((ta if kind == 'token id' else pa)[r])}: the stores are not the same tokens in the same "
                    f"order; {fix}"
                )


def check_widths(stores: list[tuple[str, Store]], what: str) -> None:
    """StoreError unless the stores have one width (what: 'd_in' of the inputs, 'd_out' of the targets)."""
    (ref_name, ref), rest = stores[0], stores[1:]
    for name, other in rest:
        if other.d_in != ref.d_in:
            raise StoreError(
                f"{name} is {other.d_in} wide but {ref_name} is {ref.d_in}; every layer's {what} store must be as wide"
            )


class StoreBatches:
    """`data=cached`: batches shuffled from a store, and its held-out tail; with data.target or data.layers,
    (x, y) pairs of the same rows of the input and target stores (one permutation of their joined rows)."""

    process_local = True  # each process reads its own shards (train_batches yields its rows only)

    def __init__(self, cfg: CachedConfig, batch_size: int, seed: int = 0):
        self.cfg = cfg
        self.layers: list[int] | None = None
        if cfg.target is None and cfg.layers is None:
            self.store = Store(cfg.path)
            self.input_stores, self.target_stores = [self.store], []
            self.reader: Store | JoinedStore = self.store
        else:
            cfg.check_pairs()
            inputs, targets = self._open_pairs(cfg)
            check_widths(inputs, "input (data.input_site)")
            check_widths(targets, "target (data.output_site)")
            check_same_rows(inputs + targets)
            self.input_stores, self.target_stores = [s for _, s in inputs], [s for _, s in targets]
            self.store = self.input_stores[0]
            self.reader = JoinedStore(self.input_stores + self.target_stores)
        self.d_in = self.store.d_in
        self.d_out: int | None = self.target_stores[0].d_in if self.target_stores else None
        self.n_layers: int | None = len(self.layers) if self.layers is not None else None
        self.hook_names = [_hook_name(s) for s in self.input_stores]
        self.hook_names_out = [_hook_name(s) for s in self.target_stores]
        self.n_eval = min(cfg.eval_tokens, self.store.n_rows // 10)
        self.n_train = self.store.n_rows - self.n_eval
        if self.n_eval == 0 or self.n_train < batch_size:
            raise StoreError(
                f"data.path='{cfg.path}': {self.store.n_rows} rows is too few for "
                f"trainer.batch_size={batch_size} plus a held-out tenth for evaluation"
            )
        truth = self.store.provenance.get("ground_truth")
        self.ground_truth = jax.device_put(np.load(self.store.path / truth)) if truth else None
        self.ground_truth_in = None

    def _open_pairs(self, cfg: CachedConfig) -> tuple[list[tuple[str, Store]], list[tuple[str, Store]]]:
        """The input and target stores, each with how a message names it; for data.target, StoreError when
        the target's site comes before the input's."""
        if cfg.target is not None:
            x, y = Store(cfg.path), Store(cfg.target)
            site_x, site_y = x.provenance.get("hook_name"), y.provenance.get("hook_name")
            if site_x and site_y and x.provenance.get("model") == y.provenance.get("model"):
                key_x, key_y = _site_key(str(site_x)), _site_key(str(site_y))
                if key_x is not None and key_y is not None and key_y < key_x:
                    raise StoreError(
                        f"data.target='{cfg.target}' (site {site_y}) comes before data.path's site {site_x}; "
                        "a transcoder predicts a later site from an earlier one"
                    )
            return [(f"data.path='{x.path}'", x)], [(f"data.target='{y.path}'", y)]
        self.layers = cfg.layer_list()
        root = Path(cfg.path).absolute()

        def opened(site: str) -> list[tuple[str, Store]]:
            stores = [Store(root / f"blocks.{layer}.{site}") for layer in self.layers]
            return [(f"'{s.path}'", s) for s in stores]

        return opened(cfg.input_site), opened(cfg.output_site)

    def _split(self, rows: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """A loaded block of rows as the batch kind: x as is for an SAE; (x, y) for pairs, [n, L, d] for layers."""
        if not self.target_stores:
            return rows
        width = len(self.input_stores) * self.d_in
        x, y = rows[:, :width], rows[:, width:]
        if self.n_layers is not None:
            x, y = x.reshape(len(rows), self.n_layers, self.d_in), y.reshape(len(rows), self.n_layers, self.d_out)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def sample(self, n: int, seed: int) -> Batch:
        """n random training rows (for the geometric-median initialisation): [n, d_in] float32 (x, y for pairs)."""
        rows = np.sort(np.random.default_rng(seed).choice(self.n_train, size=min(n, self.n_train), replace=False))
        return jax.device_put(self._split(self.reader.take(rows).astype(np.float32)))

    def train_batches(self, batch_size: int, n_batches: int, seed: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches start_batch .. n_batches − 1 of the seed's stream (a resumed run starts past 0)."""
        with StoreLoader(
            self.reader,
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
                yield jax.device_put(self._split(batch))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(self.n_train, self.store.n_rows, batch_size):
            yield jax.device_put(self._split(self.reader.read_rows(start, min(start + batch_size, self.store.n_rows))))


BATCH_SOURCES.register("cached", BatchSourceEntry(CachedConfig, StoreBatches))
