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
resumes after them. The manifest appears only when every shard is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from sae.errors import DataError

FORMAT = "sae-jax-activation-store"
VERSION = 1
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_ON_DISK = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32)}
MANIFEST, PROGRESS = "manifest.json", "progress.jsonl"


class StoreError(DataError):
    """A store cannot be used (or written); the message names the store or shard and what is wrong."""


def checksum(path: Path, chunk: int = 1 << 24) -> str:
    """BLAKE2b-128 of a file's bytes (about 0.5 GB/s on this 2-core CPU)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
    many leading rows are already stored, and the caller skips that many rows of its source.
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
            for stale in self.path.glob("shard_*"):
                stale.unlink()
            progress.write_text(json.dumps({"settings": self.settings}) + "\n")
            return []
        lines = progress.read_text().splitlines()
        earlier = json.loads(lines[0])["settings"]
        if earlier != self.settings:
            raise StoreError(
                f"'{self.path}' holds an interrupted cache run with other settings "
                f"({earlier}); resume it with those, or choose another out dir"
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
        progress.write_text("\n".join([lines[0]] + [json.dumps(s.__dict__) for s in shards]) + "\n")
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
        with open(self.path / PROGRESS, "a") as f:
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
        tmp = self.path / f"{name}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)

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
        tmp = self.path / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.path / MANIFEST)
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
