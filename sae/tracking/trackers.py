"""The trackers: W&B (offline without an API key), JSONL in the run directory, or nothing.

`make_tracker(cfg.logger, run_dir, config)` returns one `Tracker` per run (process 0 only):

- `logger=none`: a no-op; wandb is never imported and nothing is written.
- `logger=jsonl`: histograms to `run_dir/histograms.jsonl` (counts + bin edges per step) and one line
  per logged artifact to `run_dir/artifacts.jsonl`; the scalars are the loop's `metrics.jsonl`.
- `logger=wandb`: everything jsonl writes, plus a W&B run. The mode is `resolve_mode`'s: online only
  when an API key is configured, else offline (`wandb sync <dir>` uploads it later). An unreachable
  server, or an online start that fails or outlasts `logger.init_timeout`, warns once and continues
  offline, so a run never waits on the network. A resumed run passes the W&B id saved in its
  checkpoint and continues that run (offline, each start is a folder of its own with the same id).
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import socket
import string
import struct
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from sae.config import LoggerConfig
from sae.tracking.mode import resolve_mode
from sae.tracking.names import to_wandb_metrics, wandb_name
from sae.tracking.wandb_file import read_wandb_records

HISTOGRAM_BINS = 64  # W&B's default bin count


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    """Counts and bin edges of the finite values (W&B's 64 bins); non-finite ones are only counted."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
    else:
        counts, edges = np.histogram(finite, bins=bins)
    return {
        "counts": counts.astype(int).tolist(),
        "bin_edges": edges.tolist(),
        "n": int(values.size),
        "n_nonfinite": int(values.size - finite.size),
        "mean": float(finite.mean()) if finite.size else None,
    }


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and paths as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")


def _artifact_files(directory: Path, files: Sequence[str] | None) -> list[Path]:
    """The files an artifact holds: `files` (relative to directory), or every file below it except
    hidden ones and W&B's own folder."""
    if files is not None:
        paths = [directory / f for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"artifact files not found: {missing}")
        return paths
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") or part == "wandb" for part in p.relative_to(directory).parts)
    )


def _table_rows(table: Mapping[str, np.ndarray]) -> tuple[list[str], list[list]]:
    """Columns and rows of a per-feature table given as equal-length columns."""
    columns = list(table)
    arrays = [np.asarray(table[c]) for c in columns]
    lengths = {a.shape[0] if a.ndim else 1 for a in arrays}
    if len(lengths) > 1 or any(a.ndim != 1 for a in arrays):
        raise ValueError(
            f"table columns must be 1-D of equal length; got shapes { {c: a.shape for c, a in zip(columns, arrays)} }"
        )
    return columns, [list(row) for row in zip(*(a.tolist() for a in arrays))]


# --- trackers ---------------------------------------------------------------------------------------


class Tracker:
    """Logs nothing (`logger=none`); the base of the others. One per run, on process 0 only."""

    run_id: str | None = None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars of one step (our keys: loss, mse_loss, l0, fvu, dead_fraction, lr, tokens, ...)."""

    def log_histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        """Distributions, e.g. {"feature_density_log10": [d_sae], "decoder_norm": [d_sae]}; pass the density as
        log10(density + 1e-10) like SAELens, else dead latents (−inf) are left out of the bins (and counted)."""

    def log_images(self, step: int | None, images: Mapping[str, Path]) -> None:
        """PNG files by name (W&B only; the files are already in the run directory)."""

    def log_artifact(
        self,
        name: str,
        type: str,
        directory: Path,
        *,
        table: Mapping[str, np.ndarray] | None = None,
        table_name: str = "feature_stats",
        metadata: Mapping | None = None,
        aliases: Sequence[str] = (),
        files: Sequence[str] | None = None,
    ) -> None:
        """A versioned bundle: the directory's files (or `files` in it), a table (one row per entry), metadata."""

    def finish(self) -> None:
        """Flush and close; further calls do nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class JsonlTracker(Tracker):
    """Histograms to run_dir/histograms.jsonl, artifact records to run_dir/artifacts.jsonl."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def log_histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        record = {"step": int(step), **{name: histogram(v) for name, v in values.items()}}
        _append_jsonl(self.run_dir / "histograms.jsonl", record)

    def log_artifact(
        self,
        name: str,
        type: str,
        directory: Path,
        *,
        table: Mapping[str, np.ndarray] | None = None,
        table_name: str = "feature_stats",
        metadata: Mapping | None = None,
        aliases: Sequence[str] = (),
        files: Sequence[str] | None = None,
    ) -> None:
        directory = Path(directory)
        paths = _artifact_files(directory, files)
        record = {
            "name": name,
            "type": type,
            "directory": str(directory.absolute()),
            "files": [str(p.relative_to(directory)) for p in paths],
            "aliases": list(aliases),
            "metadata": dict(metadata or {}),
        }
        if table is not None:
            columns, rows = _table_rows(table)
            record["table"] = {"name": table_name, "columns": columns, "rows": len(rows)}
        _append_jsonl(self.run_dir / "artifacts.jsonl", record)


def _new_run_id() -> str:
    """A W&B-style run id (8 base-36 characters), chosen here so an offline fallback keeps it."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "artifact"


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the server of `url` opens within `timeout` seconds (nothing is sent)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


class WandbTracker(JsonlTracker):
    """A W&B run (what JsonlTracker writes, too). Files go under run_dir unless WANDB_DIR is set.

    `mode` is the mode the run got (online, offline or disabled), `run_id` its W&B id (None if disabled).
    """

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: Mapping, run_id: str | None = None, name: str | None = None
    ):
        super().__init__(run_dir)
        import wandb

        self._wandb = wandb
        sae = config.get("sae") if isinstance(config.get("sae"), Mapping) else {}
        self.sae_name, self.d_sae = sae.get("name"), sae.get("d_sae")
        mode = resolve_mode(cfg.mode)
        wandb_dir = Path(os.environ.get("WANDB_DIR") or self.run_dir).absolute()  # read per run: wandb caches it
        wandb_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {
            "project": cfg.project,
            "entity": cfg.entity,
            "group": cfg.group,
            "tags": list(cfg.tags) or None,
            "config": dict(config),
            "name": name,
            "id": run_id or _new_run_id(),
            "resume": "allow",
            "dir": str(wandb_dir),
            "settings": wandb.Settings(silent=True, init_timeout=cfg.init_timeout, reinit="create_new"),
        }
        base_url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        if mode == "online" and not _reachable(base_url, min(cfg.init_timeout, 5.0)):
            warnings.warn(f"wandb: {base_url} is unreachable; logging offline instead", RuntimeWarning, stacklevel=3)
            mode = "offline"
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as error:  # any online failure: auth, server error, init_timeout
            if mode != "online":
                raise
            # wandb's service keeps the failed run's id busy, so the offline run needs a new one
            kwargs["id"] = _new_run_id()
            warnings.warn(
                f"wandb: online start failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
                f"logging offline instead as run {kwargs['id']}",
                RuntimeWarning,
                stacklevel=3,
            )
            mode = "offline"
            self.run = wandb.init(mode=mode, **kwargs)
        self.mode = mode
        self.run_id = None if mode == "disabled" else self.run.id
        self._finished = False
        if mode == "offline":
            print(
                f"wandb: offline run {self.run.id} in {self.run.settings.sync_dir}; "
                f"upload it with `wandb sync {self.run.settings.sync_dir}`",
                flush=True,
            )
        elif mode == "online":
            print(f"wandb: run {self.run.id} at {self.run.url}", flush=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(to_wandb_metrics(metrics, self.sae_name, self.d_sae), step=int(step))

    def log_histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        super().log_histograms(step, values)
        payload: dict[str, Any] = {}
        for key, v in values.items():
            h = histogram(v)
            payload[wandb_name(key, self.sae_name)] = self._wandb.Histogram(
                np_histogram=(np.asarray(h["counts"]), np.asarray(h["bin_edges"]))
            )
            if key == "feature_density_log10":  # SAELens's companions of its density histogram
                v = np.asarray(v, dtype=np.float64)
                payload["metrics/mean_log10_feature_sparsity"] = h["mean"] if h["mean"] is not None else float("nan")
                payload["sparsity/below_1e-5"] = int((v < -5).sum())
                payload["sparsity/below_1e-6"] = int((v < -6).sum())
        self.run.log(payload, step=int(step))

    def log_images(self, step: int | None, images: Mapping[str, Path]) -> None:
        payload = {key if "/" in key else f"images/{key}": self._wandb.Image(str(path)) for key, path in images.items()}
        self.run.log(payload, step=None if step is None else int(step))

    def log_artifact(
        self,
        name: str,
        type: str,
        directory: Path,
        *,
        table: Mapping[str, np.ndarray] | None = None,
        table_name: str = "feature_stats",
        metadata: Mapping | None = None,
        aliases: Sequence[str] = (),
        files: Sequence[str] | None = None,
    ) -> None:
        super().log_artifact(
            name, type, directory, table=table, table_name=table_name, metadata=metadata, aliases=aliases, files=files
        )
        directory = Path(directory)
        meta = json.loads(json.dumps(dict(metadata or {}), default=_jsonable))
        artifact = self._wandb.Artifact(_artifact_name(name), type=type, metadata=meta)
        for path in _artifact_files(directory, files):
            artifact.add_file(str(path), name=str(path.relative_to(directory)))
        if table is not None:
            columns, rows = _table_rows(table)
            artifact.add(self._wandb.Table(columns=columns, data=rows), table_name)
        self.run.log_artifact(artifact, aliases=list(aliases) or None)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()
            if self.mode == "offline":
                _wait_for_exit_record(Path(self.run.settings.sync_file))


def _wait_for_exit_record(path: Path, timeout: float = 10.0) -> bool:
    """Wait until wandb's service has written a run's `.wandb` file through its final (exit) record:
    run.finish() can return before the file is flushed, and `wandb sync` or a reader would see a part."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            last = next(iter(collections.deque(read_wandb_records(path), maxlen=1)), None)
            if last is not None and last.WhichOneof("record_type") == "exit":
                return True
        except (OSError, ValueError, struct.error):
            pass
        time.sleep(0.05)
    return False


def make_tracker(
    cfg: LoggerConfig, run_dir: Path, config: Mapping, run_id: str | None = None, name: str | None = None
) -> Tracker:
    """The run's tracker. `run_id`: None for a new run, or the W&B id saved in a checkpoint (resume)."""
    cfg.check()
    if cfg.name == "none":
        return Tracker()
    if cfg.name == "jsonl":
        return JsonlTracker(run_dir)
    return WandbTracker(cfg, run_dir, config, run_id=run_id, name=name)
