"""The on-disk activation store: a directory of `.npy` row shards plus `manifest.json`.

Layout of a store directory:
- `shard_00000.npy` …: `[rows, d_in]` activations (bfloat16 is kept as its uint16 bit pattern, since
  `.npy` has no bfloat16; the manifest's dtype says how to view it). Optional per-row token ids and
  positions sit beside each shard in `shard_00000.tokens.npy` / `shard_00000.positions.npy` (int32).
- `manifest.json`, written last: format version, d_in, dtype, n_rows, the shards (file, rows, BLAKE2b
  checksum) and the provenance (source, model, site, dataset, context length, seed).

Shards are memory-mapped `.npy`: reading a whole shard is a sequential read (several GB/s from the page
cache), and any tool can open it. A shard is written under a temporary name and renamed when complete;
its row count and checksum go into `progress.jsonl`, so a killed cache run keeps its complete shards and
resumes after them. The manifest appears only when every shard is in place. A failed write (a full disk)
removes its temporary file, so nothing half-written looks complete; `check_out` says whether a directory
may be written into at all (empty, or an interrupted run's), before anything is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from sae.errors import DataError
from sae.outputs import write_atomic

FORMAT = "sae-jax-activation-store"
VERSION = 1
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_ON_DISK = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}
MANIFEST, PROGRESS = "manifest.json", "progress.jsonl"
NPY_HEADER = 128  # bytes of a shard's .npy header (np.save pads it to a multiple of 64)
# What a store directory holds of its own: shards (with token ids, positions), manifest, progress file, and
# their temporary files (`shard_00003.npy.tmp`, `.manifest.json.tmp`) while being written.
_OWNED = re.compile(r"\.?(shard_\d{5,}(\.tokens|\.positions)?\.npy|manifest\.json|progress\.jsonl)(\.tmp)?")


class StoreError(DataError):
    """A store cannot be used (or written); the message names the store or shard and what is wrong."""


def checksum(path: Path, chunk: int = 1 << 24) -> str:
    """BLAKE2b-128 of a file's bytes (about 0.5 GB/s on this 2-core CPU)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_out(path: str | Path, extra_files: Iterable[str] | None = ()) -> None:
    """Raise StoreError unless a cache run may write into `path`: absent, empty, or an interrupted cache run
    (its progress file) holding nothing but the store's own files and `extra_files` (e.g. ground_truth.npy).

    Reads only. extra_files None: not known yet, so an interrupted run's other files are not looked at.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"out={path} is a file, not a directory; choose an empty directory")
    if (path / MANIFEST).exists():
        raise StoreError(f"'{path}' already holds a complete store ({MANIFEST}); choose another out dir")
    names = sorted(p.name for p in path.iterdir())
    if names and PROGRESS not in names:
        raise StoreError(
            f"out={path} holds files that are not an activation store: {_listing(names)}; choose an empty directory"
        )
    if extra_files is None:
        return
    allowed = {name for extra in extra_files for name in (extra, f".{extra}.tmp")}
    foreign = [name for name in names if name not in allowed and not _OWNED.fullmatch(name)]
    if foreign:
        raise StoreError(
            f"out={path} holds an interrupted cache run and files that are not its: {_listing(foreign)}; "
            "move them away or choose an empty directory"
        )


def shard_bytes(rows: int, d_in: int, dtype: str, with_tokens: bool) -> int:
    """Bytes on disk of one shard of `rows` rows (with its token ids and positions)."""
    size = NPY_HEADER + rows * d_in * _ON_DISK[dtype].itemsize
    return size + (2 * (NPY_HEADER + rows * 4) if with_tokens else 0)


def store_bytes(n_rows: int, d_in: int, dtype: str, shard_rows: int, with_tokens: bool) -> int:
    """About how many bytes a store of n_rows takes (a little more): its shards, and its manifest (~120 bytes
    a shard, ~500 of provenance)."""
    full, last = divmod(n_rows, shard_rows)
    size = full * shard_bytes(shard_rows, d_in, dtype, with_tokens)
    if last:
        size += shard_bytes(last, d_in, dtype, with_tokens)
    return size + 120 * (full + bool(last)) + 512


def _differences(earlier: dict, now: dict, prefix: str = "") -> list[str]:
    """'field=A there but B here' for each (nested) field where two settings dicts differ."""
    out = []
    for key in sorted(set(earlier) | set(now), key=str):
        a, b = earlier.get(key, "(none)"), now.get(key, "(none)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={a!r} there but {b!r} here")
    return out


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised inside names `path`, the file being written (a failed write() names no file, and a
    failed open() its temporary file)."""
    try:
        yield
    except OSError as err:
        err.filename = str(path)
        raise


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def _side(name: str, kind: str) -> str:
    return name.replace(".npy", f".{kind}.npy")


@dataclass(frozen=True)
class Shard:
    file: str
    rows: int
    checksum: str


class StoreWriter:
    """Streams rows into shards of `shard_rows` rows; holds at most one shard in memory.

    Use as a context manager: `close()` (on a clean exit) writes the last shard and the manifest. If
    the directory holds a killed run with the same settings, writing resumes: `rows_written` says how
    many leading rows are already stored, and the caller skips that many rows of its source. Shard files
    of anything else (no progress file) are refused, never replaced. An OSError from a write (a full disk)
    leaves the complete shards and the progress file as they were, and no temporary file.
    """

    def __init__(
        self,
        path: str | Path,
        d_in: int,
        dtype: str = "float16",
        shard_rows: int = 262_144,
        provenance: dict | None = None,
        with_tokens: bool = False,
    ):
        if dtype not in DTYPES:
            raise StoreError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        if d_in <= 0 or shard_rows <= 0:
            raise StoreError(f"d_in={d_in} and shard_rows={shard_rows} must be positive")
        self.path = Path(path).absolute()
        self.settings = {
            "d_in": d_in,
            "dtype": dtype,
            "shard_rows": shard_rows,
            "with_tokens": with_tokens,
            "provenance": provenance or {},
        }
        if (self.path / MANIFEST).exists():
            raise StoreError(f"'{self.path}' already holds a complete store ({MANIFEST}); choose another out dir")
        self.path.mkdir(parents=True, exist_ok=True)
        self.shards: list[Shard] = self._resume()
        self.rows_written = sum(s.rows for s in self.shards)
        self._pending: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self._pending_rows = 0

    def _resume(self) -> list[Shard]:
        """Complete shards of an earlier, interrupted run with the same settings (checked)."""
        progress = self.path / PROGRESS
        if not progress.exists():
            stale = sorted(p.name for p in self.path.glob("shard_*"))
            if stale:
                raise StoreError(
                    f"'{self.path}' holds shard files of no cache run (no {PROGRESS}): {_listing(stale)}; "
                    "choose an empty directory"
                )
            with naming(progress):
                write_atomic(progress, (json.dumps({"settings": self.settings}) + "\n").encode())
            return []
        lines = progress.read_text().splitlines()
        try:
            earlier = json.loads(lines[0])["settings"]
        except (IndexError, ValueError, KeyError, TypeError):
            raise StoreError(f"'{progress}' is not a cache run's progress file; choose an empty directory") from None
        if earlier != self.settings:
            raise StoreError(
                f"'{self.path}' holds an interrupted cache run with other settings "
                f"({'; '.join(_differences(earlier, self.settings))}); resume it with those, or choose another out dir"
            )
        shards = []
        for line in lines[1:]:
            try:
                shard = Shard(**json.loads(line))
            except (ValueError, TypeError):
                break  # a line cut by the kill: its shard is redone
            if not (self.path / shard.file).exists() or checksum(self.path / shard.file) != shard.checksum:
                break
            shards.append(shard)
        keep = {s.file for s in shards} | {_side(s.file, k) for s in shards for k in ("tokens", "positions")}
        for stale in self.path.glob("shard_*"):
            if stale.name not in keep:
                stale.unlink()
        text = "\n".join([lines[0]] + [json.dumps(s.__dict__) for s in shards]) + "\n"
        with naming(progress):
            write_atomic(progress, text.encode())
        return shards

    def append(self, rows: np.ndarray, tokens: np.ndarray | None = None, positions: np.ndarray | None = None) -> None:
        """Add rows [n, d_in] (and, for stores with tokens, int token ids and positions [n])."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.settings["d_in"]:
            raise StoreError(f"rows of shape {rows.shape} do not match d_in={self.settings['d_in']}")
        if self.settings["with_tokens"] != (tokens is not None and positions is not None):
            raise StoreError("token ids and positions must be given with every append exactly when with_tokens")
        with np.errstate(over="ignore"):  # overflow shows up as Inf, reported below
            rows = rows.astype(DTYPES[self.settings["dtype"]])
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = self.rows_written + self._pending_rows + int(np.flatnonzero(~finite)[0])
            raise StoreError(
                f"row {bad} is NaN or Inf (or overflows {self.settings['dtype']}); the store keeps "
                f"the {self.rows_written} rows of its complete shards"
            )
        self._pending.append((rows, tokens, positions))
        self._pending_rows += len(rows)
        while self._pending_rows >= self.settings["shard_rows"]:
            self._flush(self.settings["shard_rows"])

    def _flush(self, n: int) -> None:
        """Write the first n pending rows as the next shard: temp file, fsync, rename, then record it."""
        rows, tokens, positions = (
            np.concatenate([p[i] for p in self._pending]) if self._pending[0][i] is not None else None for i in range(3)
        )
        name = shard_name(len(self.shards))
        if tokens is not None:
            self._write(_side(name, "tokens"), tokens[:n].astype(np.int32))
            self._write(_side(name, "positions"), positions[:n].astype(np.int32))
        self._write(name, rows[:n].view(_ON_DISK[self.settings["dtype"]]))
        shard = Shard(name, n, checksum(self.path / name))
        with naming(self.path / PROGRESS), open(self.path / PROGRESS, "a") as f:  # a cut line is redone on resume
            f.write(json.dumps(shard.__dict__) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.shards.append(shard)
        self.rows_written += n
        rest = len(rows) - n
        self._pending = (
            [(rows[n:], None if tokens is None else tokens[n:], None if positions is None else positions[n:])]
            if rest
            else []
        )
        self._pending_rows = rest

    def _write(self, name: str, array: np.ndarray) -> None:
        """`name` whole or not at all: a temporary file, fsync, rename; the temporary removed on failure."""
        tmp = self.path / f"{name}.tmp"
        try:
            with naming(self.path / name), open(tmp, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def close(self) -> dict:
        """Write the remaining rows and then the manifest; returns the manifest."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not self.shards:
            raise StoreError(f"no rows were written to '{self.path}'")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "d_in": self.settings["d_in"],
            "dtype": self.settings["dtype"],
            "n_rows": self.rows_written,
            "with_tokens": self.settings["with_tokens"],
            "shards": [s.__dict__ for s in self.shards],
            "provenance": self.settings["provenance"],
        }
        with naming(self.path / MANIFEST):
            write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
        (self.path / PROGRESS).unlink()
        return manifest

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class Store:
    """A complete store, checked on opening: manifest fields, every shard present with its size and shape."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            hint = (
                " (an interrupted cache run: run sae-cache again to resume it)"
                if (self.path / PROGRESS).exists()
                else ""
            )
            raise StoreError(f"'{self.path}' is not an activation store: no {MANIFEST}{hint}")
        try:
            manifest = json.loads(manifest_path.read_text())
            self.d_in, self.dtype_name, self.n_rows = int(manifest["d_in"]), manifest["dtype"], int(manifest["n_rows"])
            self.shards = [Shard(**s) for s in manifest["shards"]]
            self.with_tokens = bool(manifest.get("with_tokens", False))
            self.provenance = manifest.get("provenance", {})
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"'{manifest_path}' is not a valid manifest ({err})") from err
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise StoreError(
                f"'{manifest_path}': format {manifest.get('format')!r} version "
                f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}"
            )
        if self.dtype_name not in DTYPES:
            raise StoreError(f"'{manifest_path}': dtype {self.dtype_name!r} is not one of {sorted(DTYPES)}")
        if sum(s.rows for s in self.shards) != self.n_rows:
            raise StoreError(
                f"'{manifest_path}': shard rows sum to {sum(s.rows for s in self.shards)}, not n_rows={self.n_rows}"
            )
        self.dtype = DTYPES[self.dtype_name]
        self.offsets = np.concatenate([[0], np.cumsum([s.rows for s in self.shards])])
        for shard in self.shards:
            self._check_shape(shard)

    def _check_shape(self, shard: Shard) -> None:
        """The shard exists and its header and size match the manifest (cheap: no data read)."""
        path = self.path / shard.file
        if not path.is_file():
            raise StoreError(f"shard '{path}' is missing")
        try:
            data = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise StoreError(f"shard '{path}' is truncated or not a .npy file ({err})") from err
        if data.shape != (shard.rows, self.d_in):
            raise StoreError(f"shard '{path}' has shape {data.shape}; the manifest says ({shard.rows}, {self.d_in})")
        if data.dtype != _ON_DISK[self.dtype_name]:
            raise StoreError(f"shard '{path}' holds {data.dtype}; the manifest says {self.dtype_name}")

    def read_shard(self, index: int, verify: bool = True, check_finite: bool = False) -> np.ndarray:
        """All rows of shard `index` in memory, [rows, d_in] of the store's dtype.

        `verify` checks the shard's checksum; `check_finite` scans it for NaN/Inf rows.
        """
        shard = self.shards[index]
        path = self.path / shard.file
        if verify and checksum(path) != shard.checksum:
            raise StoreError(f"shard '{path}' does not match its checksum in the manifest (corrupted)")
        rows = np.load(path).view(self.dtype)
        if check_finite:
            finite = np.isfinite(rows).all(axis=1)
            if not finite.all():
                raise StoreError(f"shard '{path}' row {int(np.flatnonzero(~finite)[0])} contains NaN or Inf")
        return rows

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in store order (memory-mapped, unverified): [stop − start, d_in]."""
        parts = []
        for i in range(int(np.searchsorted(self.offsets, start, side="right")) - 1, len(self.shards)):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            if lo >= stop:
                break
            data = np.load(self.path / self.shards[i].file, mmap_mode="r")
            parts.append(np.asarray(data[max(start, lo) - lo : min(stop, hi) - lo]).view(self.dtype))
        return np.concatenate(parts) if parts else np.zeros((0, self.d_in), self.dtype)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at sorted global indices `rows` (memory-mapped, unverified): [len(rows), d_in]."""
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        parts = []
        for i in np.unique(shard_of):
            data = np.load(self.path / self.shards[i].file, mmap_mode="r")
            parts.append(np.asarray(data[rows[shard_of == i] - self.offsets[i]]).view(self.dtype))
        return np.concatenate(parts) if parts else np.zeros((0, self.d_in), self.dtype)

    def read_tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and positions of rows [start, stop): two int32 arrays."""
        if not self.with_tokens:
            raise StoreError(f"'{self.path}' was cached without token ids")
        out = []
        for kind in ("tokens", "positions"):
            parts = []
            for i in range(len(self.shards)):
                lo, hi = self.offsets[i], self.offsets[i + 1]
                if hi > start and lo < stop:
                    data = np.load(self.path / _side(self.shards[i].file, kind), mmap_mode="r")
                    parts.append(np.asarray(data[max(start, lo) - lo : min(stop, hi) - lo]))
            out.append(np.concatenate(parts))
        return out[0], out[1]

    def verify(self) -> None:
        """Check every shard's checksum and scan it for NaN/Inf rows (reads the whole store)."""
        for i in range(len(self.shards)):
            self.read_shard(i, verify=True, check_finite=True)
