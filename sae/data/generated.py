"""Rows generated in fixed blocks (synthetic data, a toy model): block b is a function of (seed, b) alone, so
a stream of rows restarts anywhere with the same rows (`sae-cache` resumes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
import numpy as np

from sae.data.sources import Chunk


def block_rows(width: int) -> int:
    """Rows per generated block: a power of two in [256, 65536] with about 2²⁴ numbers per [block, width]."""
    return 1 << min(16, max(8, int(math.log2((1 << 24) / width))))


def block_chunks(make_block: Callable[[int], jax.Array], size: int, n_rows: int, start: int) -> Iterator[Chunk]:
    """Rows [start, n_rows) of the stream of blocks make_block(0), make_block(1), … of `size` rows each."""
    first, end = start // size, -(-n_rows // size)
    pending = make_block(first) if first < end else None
    for b in range(first, end):
        current, pending = pending, make_block(b + 1) if b + 1 < end else None  # dispatch the next one first
        lo = b * size
        yield Chunk(np.asarray(current, np.float32)[max(start - lo, 0) : min(n_rows - lo, size)])
