"""A user's own activations in one `[n_tokens, d_in]` .npy file, memory-mapped, never loaded whole.

The last rows (data.eval_tokens, at most a tenth of the file) are held out for evaluation. Training
batches are rows drawn without replacement from a seeded permutation per epoch, read from the memory
map and put on the device by a background thread, so the train step does not wait on the disk.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

import jax
import numpy as np

from sae.config import ArraysConfig

SUPPORTED_DTYPES = (np.float16, np.float32)
_SCAN_ROWS = 1 << 16


class DataError(ValueError):
    """A user's data file cannot be used; the message names the file and the problem."""


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


class ArraySource:
    """Activations from a .npy file. ground_truth is None (unknown for real activations)."""

    ground_truth = None

    def __init__(self, cfg: ArraysConfig, batch_size: int):
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
