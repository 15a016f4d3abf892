"""`sae-cache`: stream a row source (sae/data/sources.py: `source=arrays|synthetic|toy|lm`) into an activation
store (sae/data/store.py), resuming a killed run after its complete shards.

A source's rows are the same wherever its stream starts, so a resumed store is byte-identical to an
uninterrupted one. Sources with known true features (synthetic, toy) also leave them in `ground_truth.npy`,
and a source may add files of its own (the LM's `vocab.json`).

Nothing lost, nothing overwritten: `out` must be empty, absent, or an interrupted run of the same settings
(anything else is refused before anything is written, naming what is there); it is checked writable before
the source is opened, and for room for the whole store once the source says how big it is. Ctrl-C or SIGTERM
stops after the last complete shard (Interrupted: what was kept, exit 130 / 143), and a full or read-only
disk mid-run is one OutputError line; either way the complete shards stay intact and the same command resumes.
"""

from __future__ import annotations

import errno
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sae import config as config_lib
from sae.config import CacheConfig
from sae.data.model_source import check_whole_sequences
from sae.data.sources import ROW_SOURCES, Chunk, RowSource, entry_of, open_row_source
from sae.data.store import StoreError, StoreWriter, check_out, naming, store_bytes
from sae.interrupts import Interrupted, StopSignals, signal_name
from sae.outputs import OutputError, check_space, check_writable, describe, write_atomic
from sae.progress import Progress

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


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _extra_files(source: RowSource) -> dict[str, bytes]:
    """The files a source adds beside the shards, by name: ground_truth.npy (when known) and its own."""
    files = {GROUND_TRUTH: _npy_bytes(source.ground_truth)} if source.ground_truth is not None else {}
    return files | {name: text.encode() for name, text in source.files().items()}


def check_room(source: RowSource, cfg: CacheConfig, out: Path, files: dict[str, bytes]) -> None:
    """OutputError when out's disk cannot take the rest of the store (less what an interrupted run left)."""
    needed = store_bytes(source.n_rows, source.d_in, cfg.dtype, cfg.shard_rows, source.with_tokens)
    needed += sum(len(data) for data in files.values())
    if out.is_dir():
        needed -= sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    check_space(out, max(needed, 0), "out")


def _kept(writer: StoreWriter) -> str:
    return f"{writer.rows_written} rows in {len(writer.shards)} complete shards kept in '{writer.path}'"


def _stopped(signum: int, writer: StoreWriter | None, out: Path) -> Interrupted:
    """The clean stop on a signal: what was kept, and how to go on."""
    if writer is None:
        return Interrupted(f"sae-cache stopped by {signal_name(signum)} before writing to '{out}'", signum)
    message = f"sae-cache stopped by {signal_name(signum)}: {_kept(writer)}; run the same command again to resume"
    return Interrupted(message, signum)


def _disk_error(err: OSError, writer: StoreWriter | None, out: Path) -> OutputError | None:
    """One line for a full or read-only disk mid-run (None for other OSErrors): the path, what is intact."""
    line = describe(err, err.filename or out)
    if line is None:
        return None
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f"make '{out}' writable"
    if writer is None:
        return OutputError(f"{line}; nothing was written: {fix} and run the same command again")
    return OutputError(f"{line}; {_kept(writer)}, intact: {fix} and run the same command again to resume")


def write_store(source: RowSource, cfg: CacheConfig, stop: StopSignals | None = None) -> dict:
    """Stream source.chunks into the store cfg.out, resuming after the complete shards of an interrupted run.

    stop: when its `requested` is set (a signal), stop after the last complete shard and raise Interrupted.
    """
    t0 = time.perf_counter()
    provenance = dict(source.provenance)
    if source.ground_truth is not None:
        provenance["ground_truth"] = GROUND_TRUTH
    provenance = json.loads(json.dumps(provenance))  # as the progress file records it (lists, not tuples)
    if source.resume_unit > 1:
        check_whole_sequences(cfg.shard_rows, source.resume_unit)
    out, files = Path(cfg.out).expanduser().absolute(), _extra_files(source)
    check_out(out, files)  # before any write: nothing but an interrupted run's own files
    check_room(source, cfg, out, files)
    writer = None
    try:
        writer = StoreWriter(
            out, source.d_in, cfg.dtype, cfg.shard_rows, provenance=provenance, with_tokens=source.with_tokens
        )
        return _fill(source, cfg, writer, files, stop, t0)
    except OSError as err:
        error = _disk_error(err, writer, out)
        if error is None:
            raise
        raise error from None


def _fill(
    source: RowSource, cfg: CacheConfig, writer: StoreWriter, files: dict, stop: StopSignals | None, t0: float
) -> dict:
    """Write the extra files, then the rows after the stored ones, then the manifest (write_store's body)."""
    start = writer.rows_written
    if start > source.n_rows:
        raise StoreError(f"'{writer.path}' already holds {start} rows, more than the source's {source.n_rows}")
    for name, data in files.items():
        with naming(writer.path / name):
            write_atomic(writer.path / name, data)
    if start:
        print(f"cache: resuming '{writer.path}' after its {start} stored rows", flush=True)
    print(
        f"cache: {source.n_rows} rows × {source.d_in} from {source.provenance['source']} into '{writer.path}' "
        f"({cfg.dtype}, {cfg.shard_rows} rows per shard)",
        flush=True,
    )
    progress, done = Progress(source.n_rows, start, what="cache", unit="rows"), start
    for chunk in _rechunk(source.chunks(start), cfg.chunk_rows):
        if source.with_tokens:
            writer.append(chunk.rows, tokens=chunk.tokens, positions=chunk.positions)
        else:
            writer.append(chunk.rows)
        if stop is not None and stop.requested:
            raise _stopped(stop.requested, writer, writer.path)
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
    """The `sae-cache` job: check the config and out, open the source, write the store; returns its manifest.

    Ctrl-C or SIGTERM stops it after the last complete shard (Interrupted; a second Ctrl-C aborts at once).
    """
    check(cfg)
    out = Path(cfg.out).expanduser().absolute()
    check_out(out, extra_files=None)  # before opening (and scanning) the source: a complete store, others' files
    check_writable(out, "out")
    with StopSignals(what="sae-cache") as stop:
        source = open_source(cfg)
        if stop.requested:
            raise _stopped(stop.requested, None, out)
        return write_store(source, cfg, stop)
