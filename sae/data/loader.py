"""Shuffled batches from an activation store, prefetched in a background thread.

The loader serves an endless stream of epochs. In epoch e the store's segments (its shards, cut to the
requested row range) are put in a random order, and process p of `process_count` takes every
`process_count`-th of them, so processes read disjoint parts. A process's segments are grouped into
windows of about `mixing_rows` rows; each window is loaded whole (checksums verified, optionally
scanned for NaN/Inf), its rows permuted, and the stream is the concatenation of the permuted windows.
The next window is read while the current one is served: two windows are in memory at a time, and the
trainer does not wait between them. Batch b is rows [b·B, (b+1)·B) of that stream, so a batch mixes
rows of every shard in its window, each row appears exactly once per epoch, and everything is a
function of (seed, epoch, window): a loader started at batch b yields exactly what an uninterrupted
one yields from b.

`JoinedStore` presents several stores of the same rows (a transcoder's input and target sites, cached in
one run) as one store whose rows are theirs side by side, so one loader serves them from one permutation.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from sae.data.store import Store, StoreError


@dataclass(frozen=True)
class Segment:
    shard: int
    start: int  # rows [start, stop) of the shard
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


class JoinedStore:
    """Stores of the same rows (the same shard layout and dtype) seen as one: row r is their rows r side by
    side, [d_in of the first | d_in of the second | …]. It has what StoreLoader reads of a store (path,
    dtype, n_rows, offsets, shards, read_shard), and read_rows / take / read_tokens (the first store's)."""

    def __init__(self, stores: list[Store]):
        first = stores[0]
        for other in stores[1:]:
            if not np.array_equal(other.offsets, first.offsets) or other.dtype != first.dtype:
                raise StoreError(
                    f"'{other.path}' does not hold the rows of '{first.path}' (its shards or dtype differ)"
                )
        self.stores = list(stores)
        self.path, self.dtype, self.dtype_name = first.path, first.dtype, first.dtype_name
        self.n_rows, self.offsets, self.shards = first.n_rows, first.offsets, first.shards
        self.with_tokens, self.provenance = first.with_tokens, first.provenance
        self.widths = [s.d_in for s in stores]
        self.d_in = sum(self.widths)

    def read_shard(self, index: int, verify: bool = True, check_finite: bool = False) -> np.ndarray:
        """Shard `index` of every store, side by side: [rows, sum of d_in]."""
        return np.concatenate([s.read_shard(index, verify, check_finite) for s in self.stores], axis=-1)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([s.read_rows(start, stop) for s in self.stores], axis=-1)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.concatenate([s.take(rows) for s in self.stores], axis=-1)

    def read_tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.stores[0].read_tokens(start, stop)


class StoreLoader:
    """Iterate for [batch_size, d_in] numpy batches in the store's dtype; `close()` stops the thread."""

    def __init__(
        self,
        store: Store | JoinedStore,
        batch_size: int,
        seed: int = 0,
        mixing_rows: int = 1 << 20,
        rows: tuple[int, int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
        start_batch: int = 0,
        prefetch: int = 4,
        verify: bool = True,
        check_finite: bool = False,
    ):
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.mixing_rows, self.verify, self.check_finite = mixing_rows, verify, check_finite
        self.process_index, self.process_count = process_index, process_count
        start, stop = rows if rows is not None else (0, store.n_rows)
        self.segments = [
            Segment(i, max(start, lo) - lo, min(stop, hi) - lo)
            for i, (lo, hi) in enumerate(zip(store.offsets[:-1], store.offsets[1:]))
            if min(stop, hi) > max(start, lo)
        ]
        if not 0 <= process_index < process_count or len(self.segments) < process_count:
            raise StoreError(
                f"'{store.path}': process {process_index} of {process_count} needs at least "
                f"{process_count} shards in the row range, the store has {len(self.segments)}"
            )
        if sum(s.rows for s in self.epoch_segments(0)) < batch_size:
            raise StoreError(f"'{store.path}': too few rows per process for batch_size={batch_size}")
        self.start_batch = start_batch
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._busy_seconds, self._rows_served = 0.0, 0
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    # --- the stream's layout (no data read) ---

    def epoch_segments(self, epoch: int) -> list[Segment]:
        """This process's segments in epoch order."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.segments))
        return [self.segments[i] for i in order[self.process_index :: self.process_count]]

    def windows(self, epoch: int) -> list[list[Segment]]:
        """Consecutive groups of segments of about mixing_rows rows (at least one segment each)."""
        groups, current, size = [], [], 0
        for segment in self.epoch_segments(epoch):
            if current and size + segment.rows > self.mixing_rows:
                groups.append(current)
                current, size = [], 0
            current.append(segment)
            size += segment.rows
        return groups + [current]

    def _locate(self, row: int) -> tuple[int, int, int]:
        """(epoch, window, offset in window) of stream row `row`."""
        epoch = 0
        while True:
            for w, window in enumerate(self.windows(epoch)):
                size = sum(s.rows for s in window)
                if row < size:
                    return epoch, w, row
                row -= size
            epoch += 1

    # --- loading ---

    def _load_window(self, epoch: int, w: int) -> np.ndarray:
        """The window's rows, permuted: [rows, d_in]."""
        window = self.windows(epoch)[w]
        rows = np.concatenate(
            [self.store.read_shard(s.shard, self.verify, self.check_finite)[s.start : s.stop] for s in window]
        )
        return rows[np.random.default_rng([self.seed, epoch, w + 1]).permutation(len(rows))]

    def _load_ahead(self, epoch: int, w: int) -> Callable[[], tuple[np.ndarray, float]]:
        """Start loading window w of the epoch on its own thread; the returned call waits for
        (its rows, the seconds the load took)."""
        result: dict = {}

        def load() -> None:
            began = time.perf_counter()
            try:
                result["rows"] = self._load_window(epoch, w)
            except BaseException as err:  # re-raised by the waiting producer
                result["error"] = err
            result["seconds"] = time.perf_counter() - began

        thread = threading.Thread(target=load, daemon=True)
        thread.start()

        def wait() -> tuple[np.ndarray, float]:
            thread.join()
            if "error" in result:
                raise result["error"]
            return result["rows"], result["seconds"]

        return wait

    def _produce(self) -> None:
        try:
            epoch, w, offset = self._locate(self.start_batch * self.batch_size)
            upcoming = self._load_ahead(epoch, w)
            parts, have = [], 0
            while not self._stop.is_set():
                rows, load_seconds = upcoming()
                self._busy_seconds += load_seconds
                began = time.perf_counter()
                rows = rows[offset:]
                offset = 0
                w += 1
                if w == len(self.windows(epoch)):
                    epoch, w = epoch + 1, 0
                upcoming = self._load_ahead(epoch, w)  # read while this window is served: no stall between windows
                while len(rows):
                    take = min(self.batch_size - have, len(rows))
                    parts.append(rows[:take])
                    rows, have = rows[take:], have + take
                    if have == self.batch_size:
                        batch = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
                        parts, have = [], 0
                        self._busy_seconds += time.perf_counter() - began
                        if not self._put(batch):
                            return
                        began = time.perf_counter()
                self._busy_seconds += time.perf_counter() - began
        except BaseException as err:  # surfaced in the consumer
            self._put(err)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._rows_served += len(item)
            yield item

    @property
    def rows_per_s(self) -> float:
        """Rows the background thread prepares per second of its own work (its ceiling, not the trainer's pace)."""
        produced = self._rows_served + self._queue.qsize() * self.batch_size
        return produced / self._busy_seconds if self._busy_seconds else float("nan")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> StoreLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
