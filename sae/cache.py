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

import dataclasses
import errno
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sae import config as config_lib
from sae.config import CacheConfig
from sae.data.sources import ROW_SOURCES, Chunk, RowSource, entry_of, open_row_source
from sae.data.store import MANIFEST, PROGRESS, StoreError, StoreWriter, check_out, naming, store_bytes
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
    return open_row_source(cfg.source, cfg.chunk_rows, cfg.seed, cfg.corpus)


def targets(source: RowSource, out: Path) -> dict[str | None, tuple[Path, int, dict]]:
    """{site: (store directory, d_in, provenance)}: out itself for a one-site source (key None for a source
    without sites), out/<site>/ for each site of a multi-site one (chunks then carry rows by site)."""
    sites = getattr(source, "sites", None)
    if sites is None:
        return {None: (out, source.d_in, dict(source.provenance))}
    where = (lambda site: out) if len(sites) == 1 else (lambda site: out / site)
    return {site: (where(site), source.site_dims[site], source.provenance_of(site)) for site in sites}


def _site_stores(out: Path) -> bool:
    """Whether out holds only store directories (complete or interrupted): a multi-site run's."""
    entries = list(out.iterdir()) if out.is_dir() else []
    return bool(entries) and all(p.is_dir() and ((p / MANIFEST).exists() or (p / PROGRESS).exists()) for p in entries)


def check_multi_out(out: Path, sites: list[str]) -> None:
    """A multi-site out may hold only its sites' store directories (each checked by check_out)."""
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in sites)
        if foreign:
            raise StoreError(
                f"out={out} holds files that are not this run's site stores: {', '.join(foreign[:5])}"
                f"{' …' if len(foreign) > 5 else ''}; choose an empty directory"
            )
    elif out.exists():
        raise StoreError(f"out={out} is a file, not a directory; choose an empty directory")


# --- writing -----------------------------------------------------------------------------------------


def _cut(a, part: slice):
    """A chunk field's rows `part`: an array, {site: array}, or None."""
    if a is None:
        return None
    return {k: v[part] for k, v in a.items()} if isinstance(a, dict) else a[part]


def _cat(fields: list):
    if fields[0] is None:
        return None
    if isinstance(fields[0], dict):
        return {k: np.concatenate([f[k] for f in fields]) for k in fields[0]}
    return np.concatenate(fields)


def _length(chunk: Chunk) -> int:
    return len(next(iter(chunk.rows.values()))) if isinstance(chunk.rows, dict) else len(chunk.rows)


def _rechunk(chunks: Iterator[Chunk], size: int) -> Iterator[Chunk]:
    """The same rows (and token ids, positions) in chunks of exactly `size` rows (the last may be shorter);
    rows may be an array or {site: array}."""
    buffer, held = [], 0
    for chunk in chunks:
        while _length(chunk):
            n = size - held
            take = Chunk(*(_cut(a, slice(None, n)) for a in chunk))
            buffer.append(take)
            held += _length(take)
            chunk = Chunk(*(_cut(a, slice(n, None)) for a in chunk))
            if held == size:
                yield buffer[0] if len(buffer) == 1 else Chunk(*(_cat([p[i] for p in buffer]) for i in range(3)))
                buffer, held = [], 0
    if held:
        yield buffer[0] if len(buffer) == 1 else Chunk(*(_cat([p[i] for p in buffer]) for i in range(3)))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _extra_files(source: RowSource) -> dict[str, bytes]:
    """The files a source adds beside the shards, by name: ground_truth.npy (when known) and its own."""
    files = {GROUND_TRUTH: _npy_bytes(source.ground_truth)} if source.ground_truth is not None else {}
    return files | {name: text.encode() for name, text in source.files().items()}


def check_room(source: RowSource, cfg: CacheConfig, stores: dict, files: dict[str, bytes]) -> None:
    """OutputError when out's disk cannot take the rest of the stores (less what an interrupted run left)."""
    needed = 0
    for path, d_in, _ in stores.values():
        needed += store_bytes(source.n_rows, d_in, cfg.dtype, cfg.shard_rows, source.with_tokens)
        needed += sum(len(data) for data in files.values())
        if path.is_dir():
            needed -= sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    check_space(next(iter(stores.values()))[0], max(needed, 0), "out")


def _kept(writers: list[StoreWriter]) -> str:
    where = f"'{writers[0].path}'" if len(writers) == 1 else f"each of the {len(writers)} site stores"
    rows, shards = min(w.rows_written for w in writers), min(len(w.shards) for w in writers)
    return f"{rows} rows in {shards} complete shards kept in {where}"


def _stopped(signum: int, writer: list[StoreWriter] | None, out: Path) -> Interrupted:
    """The clean stop on a signal: what was kept, and how to go on."""
    if not writer:
        return Interrupted(f"sae-cache stopped by {signal_name(signum)} before writing to '{out}'", signum)
    message = f"sae-cache stopped by {signal_name(signum)}: {_kept(writer)}; run the same command again to resume"
    return Interrupted(message, signum)


def _disk_error(err: OSError, writer: list[StoreWriter], out: Path) -> OutputError | None:
    """One line for a full or read-only disk mid-run (None for other OSErrors): the path, what is intact."""
    line = describe(err, err.filename or out)
    if line is None:
        return None
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f"make '{out}' writable"
    if not writer:
        return OutputError(f"{line}; nothing was written: {fix} and run the same command again")
    return OutputError(f"{line}; {_kept(writer)}, intact: {fix} and run the same command again to resume")


def write_store(source: RowSource, cfg: CacheConfig, stop: StopSignals | None = None) -> dict:
    """Stream source.chunks into the store cfg.out (one store per site of a multi-site source, filled in
    lockstep), resuming after the complete shards of an interrupted run. Returns the (first) manifest.

    stop: when its `requested` is set (a signal), stop after the last complete shard and raise Interrupted.
    """
    t0 = time.perf_counter()
    unit = source.resume_unit
    if cfg.shard_rows % unit:  # shards hold whole sequences, so that an interrupted run resumes on one
        whole = max(unit, cfg.shard_rows // unit * unit)
        print(f"cache: shard_rows={cfg.shard_rows} rounded to {whole}, a whole number of {unit}-row sequences")
        cfg = dataclasses.replace(cfg, shard_rows=whole)
    out, files = Path(cfg.out).expanduser().absolute(), _extra_files(source)
    stores = targets(source, out)
    if len(stores) > 1:
        check_multi_out(out, list(stores))
    for path, _, _ in stores.values():
        check_out(path, files)  # before any write: nothing but an interrupted run's own files
    check_room(source, cfg, stores, files)
    writers: list[StoreWriter] = []
    try:
        for path, d_in, provenance in stores.values():
            if source.ground_truth is not None:
                provenance["ground_truth"] = GROUND_TRUTH
            provenance = json.loads(json.dumps(provenance))  # as the progress file records it (lists, not tuples)
            writers.append(
                StoreWriter(
                    path, d_in, cfg.dtype, cfg.shard_rows, provenance=provenance, with_tokens=source.with_tokens
                )
            )
        return _fill(source, cfg, dict(zip(stores, writers)), files, stop, t0)
    except OSError as err:
        error = _disk_error(err, writers, out)
        if error is None:
            raise
        raise error from None


def _fill(source: RowSource, cfg: CacheConfig, by_site: dict, files: dict, stop: StopSignals | None, t0: float) -> dict:
    """Write the extra files, then the rows after the stored ones, then the manifests (write_store's body).

    by_site: {site (None: a source without sites): its writer}. Each store resumes after its own rows (a
    killed multi-site run may have one more shard in some)."""
    writers = list(by_site.values())
    held = [w.rows_written for w in writers]
    start = min(held)
    if max(held) > source.n_rows:
        raise StoreError(f"'{writers[0].path}' already holds {max(held)} rows, more than the source's {source.n_rows}")
    for writer in writers:
        for name, data in files.items():
            with naming(writer.path / name):
                write_atomic(writer.path / name, data)
    where = f"'{writers[0].path}'" if len(writers) == 1 else f"{len(writers)} stores in '{writers[0].path.parent}'"
    if start:
        print(
            f"cache: resuming {where} after {'its' if len(writers) == 1 else 'their'} {start} stored rows", flush=True
        )
    width = "/".join(str(w.settings["d_in"]) for w in writers)
    print(
        f"cache: {source.n_rows} rows × {width} from {source.provenance['source']} into {where} "
        f"({cfg.dtype}, {cfg.shard_rows} rows per shard)",
        flush=True,
    )
    progress, done = Progress(source.n_rows, start, what="cache", unit="rows"), start
    for chunk in _rechunk(source.chunks(start), cfg.chunk_rows):
        n = _length(chunk)
        for (site, writer), had in zip(by_site.items(), held):
            lo = max(0, had - done)  # rows this store already holds
            if lo >= n:
                continue
            rows = chunk.rows if site is None else chunk.rows[site]
            if source.with_tokens:
                writer.append(rows[lo:], tokens=chunk.tokens[lo:], positions=chunk.positions[lo:])
            else:
                writer.append(rows[lo:])
        if stop is not None and stop.requested:
            raise _stopped(stop.requested, writers, writers[0].path)
        done += n
        progress.update(done)
    if done != source.n_rows:
        raise StoreError(f"the source gave {done} rows, expected {source.n_rows}")
    manifests = [writer.close() for writer in writers]
    size = sum((w.path / s["file"]).stat().st_size for w, m in zip(writers, manifests) for s in m["shards"])
    print(
        f"cache: wrote {manifests[0]['n_rows']} rows × {width} ({manifests[0]['dtype']}) in "
        f"{len(manifests[0]['shards'])} shards{' per store' if len(writers) > 1 else ''}, "
        f"{size / 2**20:.1f} MiB, to {where} "
        f"in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return manifests[0]


def cache(cfg: CacheConfig, out_dir_ignored: str | None = None) -> dict:
    """The `sae-cache` job: check the config and out, open the source, write the store; returns its manifest.

    Ctrl-C or SIGTERM stops it after the last complete shard (Interrupted; a second Ctrl-C aborts at once).
    """
    check(cfg)
    out = Path(cfg.out).expanduser().absolute()
    if not _site_stores(out):  # (a multi-site out is checked per store once the sites are known)
        check_out(out, extra_files=None)  # before opening (and scanning) the source: a complete store, others' files
    check_writable(out, "out")
    with StopSignals(what="sae-cache") as stop:
        source = open_source(cfg)
        if stop.requested:
            raise _stopped(stop.requested, None, out)
        return write_store(source, cfg, stop)
