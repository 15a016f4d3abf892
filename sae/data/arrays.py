"""A user's own activations: `data=arrays` trains on one `[n_tokens, d_in]` .npy file, `source=arrays`
imports .npy / .safetensors files into an activation store.

Training: the file is memory-mapped, never loaded whole. The last rows (data.eval_tokens, at most a tenth
of the file) are held out for evaluation. Training batches are rows drawn without replacement from a
seeded permutation per epoch, read from the memory map and put on the device by a background thread, so
the train step does not wait on the disk.

Caching: a [n, d_in] .npy (memory-mapped), one 2-D tensor of a .safetensors file (read by slices), or a
directory / glob of .npy files concatenated in sorted order, read chunk by chunk.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open

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

SUPPORTED_DTYPES = (np.float16, np.float32)
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32}
_SCAN_ROWS = 1 << 16


@dataclasses.dataclass
class ArraysConfig(DataConfig):
    """`data=arrays`: a [n_tokens, d_in] float16/float32 .npy file."""

    name: str = "arrays"
    path: str = "???"


@dataclasses.dataclass
class ArrayRowsConfig:
    """`source=arrays` (sae-cache): existing activations."""

    name: str = "arrays"
    path: str = "???"  # a [n, d_in] .npy, a .safetensors file, or a directory / glob of .npy files
    tensor: str | None = None  # the tensor of a .safetensors file (may be omitted when it holds one)

    def check(self) -> None:
        require(bool(self.path), "source.path must name a .npy / .safetensors file or a directory of .npy files")


def open_activations(path: str | Path) -> np.ndarray:
    """Memory-map and check a `[n_tokens, d_in]` float16/float32 .npy file, scanning it for NaN/Inf."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r}: no such file (expected a [n_tokens, d_in] .npy array)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"data.path={str(path)!r}: not a readable .npy array ({err})") from None
    if array.ndim != 2:
        raise DataError(f"data.path={str(path)!r}: has shape {array.shape}, expected 2-D [n_tokens, d_in]")
    if array.dtype not in SUPPORTED_DTYPES:
        raise DataError(f"data.path={str(path)!r}: dtype {array.dtype}, expected float16 or float32")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"data.path={str(path)!r}: is empty (shape {array.shape})")
    for start in range(0, array.shape[0], _SCAN_ROWS):
        chunk = np.asarray(array[start : start + _SCAN_ROWS])
        if not np.isfinite(chunk).all():
            row = start + int(np.argwhere(~np.isfinite(chunk))[0, 0])
            raise DataError(f"data.path={str(path)!r}: row {row} contains NaN or Inf")
    return array


def prefetch(items: Iterator, depth: int = 4) -> Iterator:
    """Run `items` in a background thread, `depth` ahead of the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in items:
                buffer.put(item)
        except BaseException as err:  # surfaced in the consumer
            buffer.put(err)
        buffer.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class ArrayBatches:
    """`data=arrays`: activations from a .npy file. ground_truth is None (unknown for real activations)."""

    ground_truth = None
    process_local = False

    def __init__(self, cfg: ArraysConfig, batch_size: int, seed: int = 0):
        self.array = open_activations(cfg.path)
        n_rows, self.d_in = self.array.shape
        self.n_eval = min(cfg.eval_tokens, n_rows // 10)
        self.n_train = n_rows - self.n_eval
        if self.n_eval == 0 or self.n_train < batch_size:
            raise DataError(
                f"data.path={cfg.path!r}: {n_rows} rows is too few for trainer.batch_size={batch_size} "
                "plus a held-out tenth for evaluation"
            )

    def sample(self, n: int, seed: int) -> jax.Array:
        rows = np.random.default_rng(seed).choice(self.n_train, size=min(n, self.n_train), replace=False)
        return jax.device_put(np.asarray(self.array[np.sort(rows)], np.float32))

    def _train_rows(self, batch_size: int, n_batches: int, seed: int, start_batch: int) -> Iterator[jax.Array]:
        per_epoch = self.n_train // batch_size
        for i in range(start_batch, n_batches):
            if i % per_epoch == 0 or i == start_batch:
                order = np.random.default_rng([seed, i // per_epoch]).permutation(self.n_train)
            rows = np.sort(order[(i % per_epoch) * batch_size : (i % per_epoch + 1) * batch_size])
            yield jax.device_put(np.asarray(self.array[rows]))

    def train_batches(self, batch_size: int, n_batches: int, seed: int, start_batch: int = 0) -> Iterator[jax.Array]:
        """Batches start_batch .. n_batches − 1: epoch e visits the rows in the permutation seeded by (seed, e)."""
        return prefetch(self._train_rows(batch_size, n_batches, seed, start_batch))

    def eval_batches(self, batch_size: int) -> Iterator[jax.Array]:
        for start in range(self.n_train, self.n_train + self.n_eval, batch_size):
            yield jax.device_put(np.asarray(self.array[start : min(start + batch_size, self.n_train + self.n_eval)]))


class ArrayRows:
    """`source=arrays`: parts (files or a safetensors tensor) of [rows, d_in], read chunk by chunk."""

    ground_truth = None
    with_tokens = False
    resume_unit = 1

    def __init__(self, cfg: ArrayRowsConfig, chunk_rows: int, seed: int = 0):
        self.chunk_rows = chunk_rows
        path = Path(cfg.path).expanduser()
        if path.suffix == ".safetensors":
            label, array = self._safetensors(cfg, path)
            parts = [(label, array)]
        else:
            if cfg.tensor is not None:
                raise DataError(
                    f"source.tensor={cfg.tensor!r} is only for a .safetensors source.path, not {cfg.path!r}"
                )
            parts = [(str(f.absolute()), source_keys(open_activations, f)) for f in self._npy_files(cfg.path)]
        self.d_in = int(parts[0][1].shape[1])
        for label, array in parts:
            if array.shape[1] != self.d_in:
                raise DataError(
                    f"source.path={cfg.path!r}: '{label}' has d_in={array.shape[1]}, the earlier "
                    f"files {self.d_in} (all files must have the same d_in)"
                )
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
    def _safetensors(cfg: ArrayRowsConfig, path: Path):
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

    def chunks(self, start: int) -> Iterator[Chunk]:
        for (_, array), lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            for a in range(max(start, lo), hi, self.chunk_rows):
                yield Chunk(np.asarray(array[a - lo : min(a + self.chunk_rows, hi) - lo]))

    def files(self) -> dict[str, str]:
        return {}


@dataclasses.dataclass
class _Sliced:
    """A safetensors tensor read by row slices (keeps its file open)."""

    handle: object
    view: object
    shape: tuple[int, ...]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.view[rows]


BATCH_SOURCES.register("arrays", BatchSourceEntry(ArraysConfig, ArrayBatches))
ROW_SOURCES.register("arrays", RowSourceEntry(ArrayRowsConfig, ArrayRows))
