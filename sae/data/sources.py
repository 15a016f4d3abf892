"""What a source of activations is: two protocols, a registry each, and the schema every data config extends.

- A `BatchSource` feeds `sae-train` (`data=<name>`): batches on the device, a held-out split, a sample for
  the initialisation, and the true feature directions when they are known.
- A `RowSource` feeds `sae-cache` (`source=<name>`): its rows in fixed chunks, the same rows wherever the
  stream starts (the writer resumes after the complete shards of an interrupted run), with token ids and
  positions when they come from a language model.

Each source registers itself next to its code (`BATCH_SOURCES.register(...)`, `ROW_SOURCES.register(...)`):
its name, its schema and its factory; a row source may also name how to score an SAE spliced back into the
model the rows came from (`loss_recovered`), which `sae-train` finds from a store's provenance.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from sae.errors import DataError, require
from sae.registry import Registry


@dataclass
class DataConfig:
    """Fields every `data=` schema has."""

    name: str = "???"  # the source (each schema's default is its own name)
    eval_tokens: int = 65536  # held-out tokens for the final evaluation

    def check(self) -> None:
        """Reject impossible values; ConfigError names the field."""
        require(self.eval_tokens > 0, f"data.eval_tokens={self.eval_tokens} must be > 0")


Batch = jax.Array | tuple[jax.Array, jax.Array]  # x, or a pair (x, y) (see BatchSource)


class BatchSource(Protocol):
    """Training data for `sae-train`. A batch is x: [batch_size, d_in] on the device for an SAE, or a pair
    (x, y) for a transcoder, y: [batch_size, d_out] (a source with d_out set); with n_layers set (a CLT's
    data), x: [batch_size, n_layers, d_in] and y: [batch_size, n_layers, d_out]. Sources that only give x
    need not define d_out, n_layers or ground_truth_in."""

    d_in: int
    d_out: int | None  # the target's width for pairs; None (or absent): batches are x alone
    n_layers: int | None  # layers of a cross-layer source; None (or absent): one layer
    ground_truth: jax.Array | np.ndarray | None  # [n_features, d_out] unit directions a decoder should recover
    ground_truth_in: jax.Array | np.ndarray | None  # [n_features, d_in] those a transcoder's encoder should
    process_local: bool  # train_batches yields this process's rows only (multi-host)

    def sample(self, n: int, seed: int) -> jax.Array:
        """n training rows (x, or pairs) for the initialisation, float32 (b_dec: x's geometric median, y's mean)."""

    def train_batches(self, batch_size: int, n_batches: int, seed: int, start_batch: int = 0) -> Iterator[jax.Array]:
        """Batches start_batch .. n_batches − 1 of the seed's stream (a resumed run starts past 0)."""

    def eval_batches(self, batch_size: int) -> Iterator[jax.Array]:
        """The held-out rows."""


class Chunk(NamedTuple):
    """Rows of a row source: rows [n, d_in] float16/float32; tokens, positions [n] int32 or None."""

    rows: np.ndarray
    tokens: np.ndarray | None = None
    positions: np.ndarray | None = None


class RowSource(Protocol):
    """Rows for `sae-cache`."""

    d_in: int
    n_rows: int
    provenance: dict  # what the rows are (recorded in the store's manifest); "source" is the registry name
    ground_truth: np.ndarray | None  # [n_features, d_in] unit directions, when known
    with_tokens: bool  # chunks carry token ids and positions
    resume_unit: int  # rows per sequence: shards must hold whole ones, so a resume starts on a sequence (1: any)

    def chunks(self, start: int) -> Iterator[Chunk]:
        """Rows start .. n_rows − 1 in order (start: rows already stored, a multiple of `resume_unit`)."""

    def files(self) -> dict[str, str]:
        """Extra text files for the store directory (e.g. vocab.json), by name."""


@dataclass(frozen=True)
class BatchSourceEntry:
    schema: type  # the `data=<name>` schema
    open: Callable[[Any, int, int], BatchSource]  # (cfg, batch_size, seed) -> source


@dataclass(frozen=True)
class RowSourceEntry:
    schema: type  # the `source=<name>` schema
    open: Callable[[Any, int, int], RowSource]  # (cfg, chunk_rows, seed) -> source
    # (store directory, reconstruct: x [n, d_in] -> x̂) -> {"ce_loss_score", "kl_div", ...}, for rows of a model
    loss_recovered: Callable[[Path, Callable[[jax.Array], jax.Array]], dict] | None = None
    # (store directory, [(input site, output site)] per replaced layer, predict(j, inputs) -> ŷ_j) ->
    # {"ce_loss_score", "kl_div", "top1_agreement", ...}: a transcoder stack or CLT as the model's MLPs
    replacement: Callable[[Path, list, Callable], dict] | None = None
    corpus: bool = False  # open() also takes the cache config's `corpus` (a model source reads text)


BATCH_SOURCES: Registry[BatchSourceEntry] = Registry("data", ("sae.data",))
ROW_SOURCES: Registry[RowSourceEntry] = Registry("source", ("sae.data",))


def entry_of(registry: Registry, cfg) -> BatchSourceEntry | RowSourceEntry:
    """The registry's entry for cfg.name; ConfigError unless cfg is of that entry's schema."""
    entry = registry[cfg.name]
    require(type(cfg) is entry.schema, f"{registry.key}.name={cfg.name!r} does not match its schema")
    return entry


def open_batch_source(cfg, batch_size: int, seed: int) -> BatchSource:
    """The training source named by the data config."""
    return entry_of(BATCH_SOURCES, cfg).open(cfg, batch_size, seed)


def open_row_source(cfg, chunk_rows: int, seed: int, corpus=None) -> RowSource:
    """The row source named by the source config (given `corpus`, the text config, if it reads text)."""
    entry = entry_of(ROW_SOURCES, cfg)
    return entry.open(cfg, chunk_rows, seed, corpus) if entry.corpus else entry.open(cfg, chunk_rows, seed)


def source_keys(fn: Callable, *args):
    """fn(*args) for sae-cache, with the data.* keys in the DataError messages of sae.data renamed to source.*."""
    try:
        return fn(*args)
    except DataError as err:
        raise DataError(re.sub(r"\bdata\.(path|run|setting)=", r"source.\1=", str(err))) from None
