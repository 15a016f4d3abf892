"""`sae-cache`: stream a source's rows into an activation store (sae/data/store.py), resuming a killed run.

A source has `d_in`, `n_rows`, `provenance`, `ground_truth` ([n_features, d_in] or None) and
`rows(start)`: float16/float32 chunks [rows, d_in] of its rows from `start` on, the same rows wherever
the stream starts, because the writer resumes after the complete shards of an interrupted run.
- arrays: a [n, d_in] .npy (memory-mapped), one 2-D tensor of a .safetensors file (read by slices), or
  a directory / glob of .npy files concatenated in sorted order.
- synthetic: SyntheticFeatures rows (the ground truth of `sae-train data=synthetic` with the same seed),
  generated in blocks of fixed size, block b from fold_in(key, b).
- toy: a trained toy model's hidden activations, likewise in fixed blocks (ToyModelSource.block).
Synthetic and toy stores also hold the ground-truth directions in `ground_truth.npy`.
- lm: one site of an lm-train model over its corpus (sae/lm/source.py); it writes its own store, with
  token ids and positions, and records the LM run and site in the manifest's provenance.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open

from sae import config as config_lib
from sae.config import ArraysSourceConfig, CacheConfig, LMSourceConfig, SyntheticSourceConfig, ToySourceConfig
from sae.data.arrays import DataError, open_activations
from sae.data.store import MANIFEST, StoreError, StoreWriter
from sae.data.synthetic import SyntheticFeatures
from sae.data.toy import ToyModelSource

GROUND_TRUTH = "ground_truth.npy"
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32}


def _source_keys(fn: Callable, *args):
    """fn(*args), with the data.* keys in the DataError messages of sae.data renamed to source.*."""
    try:
        return fn(*args)
    except DataError as err:
        raise DataError(re.sub(r"\bdata\.(path|run|setting)=", r"source.\1=", str(err))) from None


def block_rows(width: int) -> int:
    """Rows per generated block: a power of two in [256, 65536] with about 2²⁴ numbers per [block, width]."""
    return 1 << min(16, max(8, int(math.log2((1 << 24) / width))))


def _blocks(make_block: Callable[[int], jax.Array], size: int, n_rows: int, start: int) -> Iterator[np.ndarray]:
    """Rows [start, n_rows) of the stream of blocks make_block(0), make_block(1), … of `size` rows each."""
    first, end = start // size, -(-n_rows // size)
    pending = make_block(first) if first < end else None
    for b in range(first, end):
        current, pending = pending, make_block(b + 1) if b + 1 < end else None  # dispatch the next one first
        lo = b * size
        yield np.asarray(current, np.float32)[max(start - lo, 0) : min(n_rows - lo, size)]


# --- sources -----------------------------------------------------------------------------------------


class ArraysSource:
    """Existing activations: parts (files or a safetensors tensor) of [rows, d_in], read chunk by chunk."""

    ground_truth = None

    def __init__(self, cfg: ArraysSourceConfig, chunk_rows: int, seed: int = 0):
        self.chunk_rows = chunk_rows
        path = Path(cfg.path).expanduser()
        if path.suffix == ".safetensors":
            label, array = self._safetensors(cfg, path)
            parts = [(label, array)]
        else:
            if cfg.tensor is not None:
                raise DataError(f"source.tensor={cfg.tensor!r} is only for a .safetensors source.path, "
                                f"not {cfg.path!r}")
            parts = [(str(f.absolute()), _source_keys(open_activations, f)) for f in self._npy_files(cfg.path)]
        self.d_in = int(parts[0][1].shape[1])
        for label, array in parts:
            if array.shape[1] != self.d_in:
                raise DataError(f"source.path={cfg.path!r}: '{label}' has d_in={array.shape[1]}, the earlier "
                                f"files {self.d_in} (all files must have the same d_in)")
        self.parts = parts
        self.offsets = np.concatenate([[0], np.cumsum([a.shape[0] for _, a in parts])]).astype(int)
        self.n_rows = int(self.offsets[-1])
        config = {"path": str(path.absolute()), "tensor": cfg.tensor}
        files = [{"file": label, "rows": int(a.shape[0])} for label, a in parts]
        self.provenance = {"source": "arrays", "config": config, "files": files, "seed": seed}

    @staticmethod
    def _npy_files(spec: str) -> list[Path]:
        """One .npy file, the .npy files of a directory, or the files a glob matches; sorted."""
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise DataError(f"source.path={spec!r}: a directory without .npy files")
            return files
        if any(c in spec for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if os.path.isfile(p))
            if not files:
                raise DataError(f"source.path={spec!r}: no file matches")
            return files
        return [path]

    @staticmethod
    def _safetensors(cfg: ArraysSourceConfig, path: Path):
        """The named (or only) 2-D float16/float32 tensor of a .safetensors file, as a sliceable view."""
        where = f"source.path={cfg.path!r}"
        if not path.is_file():
            raise DataError(f"{where}: no such file (expected a .safetensors file)")
        try:
            handle = safe_open(str(path), framework="numpy")
            names = sorted(handle.keys())
        except Exception as err:  # safetensors raises its own SafetensorError  # noqa: BLE001
            raise DataError(f"{where}: not a readable .safetensors file ({err})") from None
        name = cfg.tensor
        if name is None:
            if len(names) != 1:
                raise DataError(f"{where} holds {len(names)} tensors {names}; pick one with source.tensor=<name>")
            name = names[0]
        elif name not in names:
            raise DataError(f"source.tensor={name!r} is not in {where}; it holds {names}")
        view = handle.get_slice(name)
        shape, dtype = tuple(view.get_shape()), view.get_dtype()
        where = f"{where} tensor {name!r}"
        if len(shape) != 2:
            raise DataError(f"{where} has shape {shape}, expected 2-D [n_tokens, d_in]")
        if dtype not in _SAFETENSORS_DTYPES:
            raise DataError(f"{where} has dtype {dtype}, expected F16 or F32")
        if 0 in shape:
            raise DataError(f"{where} is empty (shape {shape})")
        return f"{path.absolute()}:{name}", _Sliced(handle, view, shape)

    def rows(self, start: int = 0) -> Iterator[np.ndarray]:
        for (_, array), lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            for a in range(max(start, lo), hi, self.chunk_rows):
                yield np.asarray(array[a - lo : min(a + self.chunk_rows, hi) - lo])


@dataclasses.dataclass
class _Sliced:
    """A safetensors tensor read by row slices (keeps its file open)."""

    handle: object
    view: object
    shape: tuple[int, ...]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.view[rows]


class SyntheticCacheSource:
    """n_rows synthetic activations; the directions are those of `sae-train data=synthetic` with the same seed."""

    def __init__(self, cfg: SyntheticSourceConfig, seed: int):
        key = jax.random.PRNGKey(seed)
        self.features = SyntheticFeatures.create(cfg, jax.random.fold_in(key, 0))
        self._key = jax.random.fold_in(key, 4)  # 1..3: sae-train's train / eval / sample streams
        self._sample = jax.jit(self.features.sample, static_argnums=1)
        self.d_in, self.n_rows = cfg.d_in, cfg.n_rows
        self.block_rows = block_rows(max(cfg.n_features, cfg.d_in))
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval_tokens"}
        self.provenance = {"source": "synthetic", "config": config, "block_rows": self.block_rows, "seed": seed}

    @property
    def ground_truth(self) -> np.ndarray:
        """[n_features, d_in] unit directions."""
        return np.asarray(self.features.directions, np.float32)

    def block(self, index: int) -> jax.Array:
        return self._sample(jax.random.fold_in(self._key, index), self.block_rows)

    def rows(self, start: int = 0) -> Iterator[np.ndarray]:
        return _blocks(self.block, self.block_rows, self.n_rows, start)


class ToyCacheSource:
    """n_rows hidden activations of one setting of a trained toy model; ground truth: its represented features."""

    def __init__(self, cfg: ToySourceConfig, seed: int):
        run_cfg = config_lib.ToyRunConfig(name="toy", run=cfg.run, setting=cfg.setting)
        self.toy = _source_keys(ToyModelSource, run_cfg, seed)
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

    def rows(self, start: int = 0) -> Iterator[np.ndarray]:
        return _blocks(self.block, self.block_rows, self.n_rows, start)


def open_source(cfg: CacheConfig):
    """The source named by cfg.source."""
    source = cfg.source
    if isinstance(source, ArraysSourceConfig):
        return ArraysSource(source, cfg.chunk_rows, cfg.seed)
    if isinstance(source, SyntheticSourceConfig):
        return SyntheticCacheSource(source, cfg.seed)
    if isinstance(source, ToySourceConfig):
        return ToyCacheSource(source, cfg.seed)
    if isinstance(source, LMSourceConfig):  # writes its own store, with token ids (sae/lm/source.py)
        from sae.lm.source import LMCacheSource

        return LMCacheSource(source, cfg.seed)
    raise DataError(f"source.name={getattr(source, 'name', None)!r} is not one of "
                    f"['arrays', 'synthetic', 'toy', 'lm']")


# --- writing -----------------------------------------------------------------------------------------


def _rechunk(chunks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The same rows in chunks of exactly `size` rows (the last may be shorter)."""
    buffer, held = [], 0
    for chunk in chunks:
        while len(chunk):
            take = chunk[: size - held]
            buffer.append(take)
            held += len(take)
            chunk = chunk[len(take) :]
            if held == size:
                yield buffer[0] if len(buffer) == 1 else np.concatenate(buffer)
                buffer, held = [], 0
    if held:
        yield buffer[0] if len(buffer) == 1 else np.concatenate(buffer)


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
        print(f"cache: {rows}/{self.total} rows ({100 * rows / self.total:.0f}%)  {rate:,.0f} rows/s  ETA {eta_text}",
              flush=True)
        self.next = self._after(rows)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_store(source, cfg: CacheConfig) -> dict:
    """Stream source.rows into the store cfg.out, resuming after the complete shards of an interrupted run."""
    t0 = time.perf_counter()
    provenance = dict(source.provenance)
    if source.ground_truth is not None:
        provenance["ground_truth"] = GROUND_TRUTH
    provenance = json.loads(json.dumps(provenance))  # as the progress file records it (lists, not tuples)
    writer = StoreWriter(Path(cfg.out).expanduser(), source.d_in, cfg.dtype, cfg.shard_rows, provenance=provenance,
                         with_tokens=False)
    start = writer.rows_written
    if start > source.n_rows:
        raise StoreError(f"'{writer.path}' already holds {start} rows, more than the source's {source.n_rows}")
    if source.ground_truth is not None:
        _save_atomic(writer.path / GROUND_TRUTH, source.ground_truth)
    if start:
        print(f"cache: resuming '{writer.path}' after its {start} stored rows", flush=True)
    print(f"cache: {source.n_rows} rows × {source.d_in} from {provenance['source']} into '{writer.path}' "
          f"({cfg.dtype}, {cfg.shard_rows} rows per shard)", flush=True)
    progress, done = _Progress(source.n_rows, start), start
    for chunk in _rechunk(source.rows(start), cfg.chunk_rows):
        writer.append(chunk)
        done += len(chunk)
        progress.update(done)
    if done != source.n_rows:
        raise StoreError(f"the source gave {done} rows, expected {source.n_rows}")
    manifest = writer.close()
    size = sum((writer.path / s["file"]).stat().st_size for s in manifest["shards"])
    print(f"cache: wrote {manifest['n_rows']} rows × {manifest['d_in']} ({manifest['dtype']}) in "
          f"{len(manifest['shards'])} shards, {size / 2**20:.1f} MiB, to '{writer.path}' "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return manifest


def cache(cfg: CacheConfig, out_dir_ignored: str | None = None) -> dict:
    """The `sae-cache` job: check the config, open the source, write the store; returns its manifest."""
    config_lib.check_cache(cfg)
    out = Path(cfg.out).expanduser().absolute()
    if (out / MANIFEST).exists():  # before opening (and scanning) the source
        raise StoreError(f"'{out}' already holds a complete store ({MANIFEST}); choose another out dir")
    source = open_source(cfg)
    return source.write_store(cfg) if hasattr(source, "write_store") else write_store(source, cfg)
