"""A run's `.wandb` file read back without network (tests, offline inspection;
`python -m sae.tracking RUN.wandb` prints it)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32768  # the LevelDB log format W&B uses: 32 KiB blocks of 7-byte-header chunks
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record` messages of a run's `.wandb` file, in order.

    Format: a 7-byte file header (":W&B", 0xBEE1, version 0), then LevelDB log chunks (crc32c:4,
    length:2, type:1, data) that never straddle a 32 KiB block; a record is one FULL chunk or
    FIRST, MIDDLE..., LAST. A truncated tail (a killed writer) ends the iteration.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero fill up to the next block
            pos += left
            continue
        if pos + 7 + length > len(data):
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _nested(items) -> dict:
    """History/summary items (nested_key paths + JSON values) as a nested dict."""
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


def read_wandb_run(path: Path) -> dict:
    """A `.wandb` file as plain values: run id, config, history rows (by `_step`), artifacts.

    Artifacts: name, type, aliases, metadata and the manifest's entries {path: local staged copy}.
    """
    run: dict[str, Any] = {"run_id": None, "resumed": False, "config": {}, "history": [], "artifacts": []}
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run_id"], run["resumed"] = record.run.run_id, record.run.resume
            run["config"].update(_nested(record.run.config.update))
        elif kind == "config":
            run["config"].update(_nested(record.config.update))
        elif kind == "history":
            run["history"].append(_nested(record.history.item))
        elif kind == "artifact":
            a = record.artifact
            run["artifacts"].append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": sorted(a.aliases),
                    "metadata": json.loads(a.metadata) if a.metadata else {},
                    "files": {c.path: c.local_path for c in a.manifest.contents},
                }
            )
    return run
