"""Activation sources and stores: training batches (`data=`), rows to cache (`source=`), the store format
and its loader. Each source registers itself in its module (see sae/data/sources.py)."""

from sae.data.sources import BATCH_SOURCES, ROW_SOURCES, BatchSource, RowSource, open_batch_source, open_row_source
from sae.errors import DataError

__all__ = [
    "BATCH_SOURCES",
    "ROW_SOURCES",
    "BatchSource",
    "DataError",
    "RowSource",
    "open_batch_source",
    "open_row_source",
]
