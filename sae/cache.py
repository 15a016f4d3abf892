"""`sae-cache`: stream a row source (sae/data/sources.py: `source=arrays|synthetic|toy|lm`) into an activation
store (sae/data/store.py), resuming a killed run after its complete shards.

A source's rows are the same wherever its stream starts, so a resumed store is byte-identical to an
uninterrupted one. Sources with known true features (synthetic, toy) also leave them in `ground_truth.npy`,
and a source may add files of its own (the LM's `vocab.json`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sae import config as config_lib
from sae.config import CacheConfig
from sae.data.model_source import check_whole_sequences
from sae.data.sources import ROW_SOURCES, Chunk, RowSource, entry_of, open_row_source
from sae.data.store import MANIFEST, StoreError, StoreWriter

GROUND_TRUTH = "ground_truth.npy"


def check(cfg: CacheConfig) -> None:
    """Reject impossible sae-cache values, and a source config of another source's schema. Raises ConfigError."""
    config_lib.check_cache(cfg)
    entry_of(ROW_SOURCES, cfg.source)


def open_source(cfg: CacheConfig) -> RowSource:
    """The row source named by cfg.source."""
    return open_row_source(cfg.source, cfg.chunk_rows, cfg.seed)


# --- writing -----------------------------------------------------------------------------------------


def _joined(parts: list[Chunk]) -> Chunk:
    if len(parts) == 1:
        return parts[0]
    return Chunk(*(None if parts[0][i] is None else np.concatenate([p[i] for p in parts]) for i in range(3)))


def _rechunk(chunks: Iterator[Chunk], size: int) -> Iterator[Chunk]:
    """The same rows (and token ids, positions) in chunks of exactly `size` rows (the last may be shorter)."""
    buffer, held = [], 0
    for chunk in chunks:
        while len(chunk.rows):
            n = size - held
            take = Chunk(*(None if a is None else a[:n] for a in chunk))
            buffer.append(take)
            held += len(take.rows)
            chunk = Chunk(*(None if a is None else a[n:] for a in chunk))
            if held == size:
                yield _joined(buffer)
                buffer, held = [], 0
    if held:
        yield _joined(buffer)


class _Progress:
    """A line per ~5% of the rows: rows, rows/s and ETA."""

    def __init__(self, total: int, done: int):
        self.total, self.first, self.t0 = total, done, time.perf_counter()
        self.next = self._after(done)

    def _after(self, rows: int) -> int:
        return math.ceil((math.floor(rows * 20 / self.total) + 1) * self.total / 20)

    def update(self, rows: int) -> None:
        if rows < self.next and rows < self.total:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = (rows - self.first) / elapsed
        eta = (self.total - rows) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        print(
            f"cache: {rows}/{self.total} rows ({100 * rows / self.total:.0f}%)  {rate:,.0f} rows/s  ETA {eta_text}",
            flush=True,
        )
        self.next = self._after(rows)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_store(source: RowSource, cfg: CacheConfig) -> dict:
    """Stream source.chunks into the store cfg.out, resuming after the complete shards of an interrupted run."""
    t0 = time.perf_counter()
    provenance = dict(source.provenance)
    if source.ground_truth is not None:
        provenance["ground_truth"] = GROUND_TRUTH
    provenance = json.loads(json.dumps(provenance))  # as the progress file records it (lists, not tuples)
    if source.resume_unit > 1:
        check_whole_sequences(cfg.shard_rows, source.resume_unit)
    writer = StoreWriter(
        Path(cfg.out).expanduser(),
        source.d_in,
        cfg.dtype,
        cfg.shard_rows,
        provenance=provenance,
        with_tokens=source.with_tokens,
    )
    start = writer.rows_written
    if start > source.n_rows:
        raise StoreError(f"'{writer.path}' already holds {start} rows, more than the source's {source.n_rows}")
    if source.ground_truth is not None:
        _save_atomic(writer.path / GROUND_TRUTH, source.ground_truth)
    for name, text in source.files().items():
        (writer.path / name).write_text(text)
    if start:
        print(f"cache: resuming '{writer.path}' after its {start} stored rows", flush=True)
    print(
        f"cache: {source.n_rows} rows × {source.d_in} from {provenance['source']} into '{writer.path}' "
        f"({cfg.dtype}, {cfg.shard_rows} rows per shard)",
        flush=True,
    )
    progress, done = _Progress(source.n_rows, start), start
    for chunk in _rechunk(source.chunks(start), cfg.chunk_rows):
        if source.with_tokens:
            writer.append(chunk.rows, tokens=chunk.tokens, positions=chunk.positions)
        else:
            writer.append(chunk.rows)
        done += len(chunk.rows)
        progress.update(done)
    if done != source.n_rows:
        raise StoreError(f"the source gave {done} rows, expected {source.n_rows}")
    manifest = writer.close()
    size = sum((writer.path / s["file"]).stat().st_size for s in manifest["shards"])
    print(
        f"cache: wrote {manifest['n_rows']} rows × {manifest['d_in']} ({manifest['dtype']}) in "
        f"{len(manifest['shards'])} shards, {size / 2**20:.1f} MiB, to '{writer.path}' "
        f"in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return manifest


def cache(cfg: CacheConfig, out_dir_ignored: str | None = None) -> dict:
    """The `sae-cache` job: check the config, open the source, write the store; returns its manifest."""
    check(cfg)
    out = Path(cfg.out).expanduser().absolute()
    if (out / MANIFEST).exists():  # before opening (and scanning) the source
        raise StoreError(f"'{out}' already holds a complete store ({MANIFEST}); choose another out dir")
    return write_store(open_source(cfg), cfg)
