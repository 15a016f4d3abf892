"""Experiment tracking: W&B (offline without an API key), JSONL in the run directory, or nothing.

`make_tracker(cfg.logger, run_dir, config)` returns one `Tracker` per run (process 0 only):

- `logger=none`: a no-op; wandb is never imported and nothing is written.
- `logger=jsonl`: histograms to `run_dir/histograms.jsonl` (counts + bin edges per step) and one line
  per logged artifact to `run_dir/artifacts.jsonl`; the scalars are the loop's `metrics.jsonl`.
- `logger=wandb`: everything jsonl writes, plus a W&B run. The mode is `resolve_mode`'s: online only
  when an API key is configured, else offline (`wandb sync <dir>` uploads it later). An unreachable
  server, or an online start that fails or outlasts `logger.init_timeout`, warns once and continues
  offline, so a run never waits on the network. A resumed run passes the W&B id saved in its
  checkpoint and continues that run (offline, each start is a folder of its own with the same id).

Scalars go to W&B under SAELens's names (`WANDB_NAMES`), so SAELens dashboards carry over.
`read_wandb_run` reads a run's `.wandb` file back without network (tests, offline inspection;
`python -m sae.tracking RUN.wandb` prints it).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import secrets
import socket
import string
import struct
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

LOGGER_NAMES = ("wandb", "jsonl", "none")
WANDB_MODES = ("online", "offline", "disabled")
HISTOGRAM_BINS = 64  # W&B's default bin count


@dataclass
class LoggerConfig:
    """`logger=` group: where a run's curves, histograms and feature dictionaries go."""

    name: str = "jsonl"  # wandb | jsonl | none
    project: str = "sae-jax"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; null: online with an API key, else offline
    histogram_every: int = 500  # steps between feature-density / decoder-norm histograms
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    init_timeout: float = 30.0  # seconds an online wandb.init may take before the run goes offline


def register_schemas(cs) -> None:
    """Store the schema in Hydra's ConfigStore so conf/logger/*.yaml can extend it (`logger_schema`)."""
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)


def check_logger(cfg: LoggerConfig) -> None:
    """Reject impossible logger values. Raises sae.config.ConfigError naming the field."""
    from sae.config import ConfigError  # imported here: sae.config imports this module

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    require(cfg.name in LOGGER_NAMES, f"logger.name={cfg.name!r} must be one of {'|'.join(LOGGER_NAMES)}")
    require(cfg.mode is None or cfg.mode in WANDB_MODES,
            f"logger.mode={cfg.mode!r} must be null or one of {'|'.join(WANDB_MODES)}")
    require(isinstance(cfg.project, str) and bool(cfg.project.strip()), "logger.project must be a non-empty name")
    require(isinstance(cfg.histogram_every, int) and cfg.histogram_every > 0,
            f"logger.histogram_every={cfg.histogram_every} must be a positive number of steps")
    require(all(isinstance(t, str) and t for t in cfg.tags), f"logger.tags={list(cfg.tags)} must be non-empty strings")
    require(cfg.init_timeout > 0 and math.isfinite(cfg.init_timeout),
            f"logger.init_timeout={cfg.init_timeout} must be a positive number of seconds")


# --- metric names ----------------------------------------------------------------------------------

# Our step-metric keys -> SAELens's W&B keys, from jbloomAus/SAELens sae_lens/training/sae_trainer.py
# (`_build_train_step_log_dict`, `_build_sparsity_log_dict`), the loss names of sae_lens/saes/*.py
# (`TrainingSAE.training_forward_pass`: mse_loss; standard: l1_loss; topk/batchtopk/gated:
# auxiliary_reconstruction_loss; jumprelu: l0_loss) and `TrainingSAE.log_histograms` (weights/W_dec_norms).
# SAELens logs the sparsity coefficient as details/{l1|l0}_coefficient and dead latents as a count.
SAELENS_NAMES: dict[str, str] = {
    "loss": "losses/overall_loss",
    "mse_loss": "losses/mse_loss",
    "l1_loss": "losses/l1_loss",
    "auxk_loss": "losses/auxiliary_reconstruction_loss",  # TopK family's AuxK
    "gate_aux_loss": "losses/auxiliary_reconstruction_loss",  # Gated SAE's via-gate reconstruction
    "l0_loss": "losses/l0_loss",  # JumpReLU
    "explained_variance": "metrics/explained_variance",  # 1 − FVU (SAELens: 1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²)
    "l0": "metrics/l0",
    "dead_features": "sparsity/dead_features",  # count = round(dead_fraction · d_sae)
    "lr": "details/current_learning_rate",
    "sparsity_coefficient": "details/l1_coefficient",  # JumpReLU: l0; TopK family: none (SPARSITY_COEFFICIENT_NAMES)
    "tokens": "details/n_training_tokens",
    # histograms (log_histograms)
    "feature_density_log10": "plots/feature_density_line_chart",
    "decoder_norm": "weights/W_dec_norms",
}
# Ours, where SAELens has no equivalent.
OWN_NAMES: dict[str, str] = {
    "fvu": "metrics/fvu",
    "dead_fraction": "sparsity/dead_fraction",
    "tokens_per_s": "metrics/tokens_per_s",
}
WANDB_NAMES: dict[str, str] = {**SAELENS_NAMES, **OWN_NAMES}


# SAELens's coefficient per family: `details/{name}_coefficient` of `get_coefficients()`; TopK has none.
SPARSITY_COEFFICIENT_NAMES: dict[str, str | None] = {
    "jumprelu": "details/l0_coefficient", "topk": None, "batchtopk": None, "matryoshka": None}


def wandb_name(key: str, sae_name: str | None = None) -> str | None:
    """W&B key of one of our metric keys (None: not logged); unknown keys go under metrics/, keys with a
    '/' pass through."""
    if key == "sparsity_coefficient" and sae_name in SPARSITY_COEFFICIENT_NAMES:
        return SPARSITY_COEFFICIENT_NAMES[sae_name]
    if "/" in key:
        return key
    return WANDB_NAMES.get(key, f"metrics/{key}")


def to_wandb_metrics(metrics: Mapping[str, float], sae_name: str | None = None,
                     d_sae: int | None = None) -> dict[str, float]:
    """Rename a step's metrics for W&B, adding explained_variance (1 − fvu) and the dead-latent count.
    A "step" entry is dropped: it is W&B's own step."""
    values = {k: float(v) for k, v in metrics.items() if k != "step"}
    if "fvu" in values and "explained_variance" not in values:
        values["explained_variance"] = 1.0 - values["fvu"]
    if "dead_fraction" in values and d_sae and "dead_features" not in values and math.isfinite(values["dead_fraction"]):
        values["dead_features"] = float(round(values["dead_fraction"] * d_sae))
    names = {k: wandb_name(k, sae_name) for k in values}
    return {names[k]: v for k, v in values.items() if names[k] is not None}


# --- W&B mode ---------------------------------------------------------------------------------------


def has_api_key(environ: Mapping[str, str] | None = None) -> bool:
    """True when a W&B API key is configured: WANDB_API_KEY, or a netrc entry for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    home = environ.get("HOME") or os.path.expanduser("~")
    path = Path(environ.get("NETRC") or Path(home) / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(requested: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The W&B mode to use: WANDB_MODE if set, else `requested`, else online with an API key, offline without.

    An online mode without an API key becomes offline: wandb would otherwise ask for a login and wait.
    """
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    aliases = {"dryrun": "offline", "run": "online"}
    mode = environ.get("WANDB_MODE", "").strip().lower() or requested
    mode = aliases.get(mode, mode)
    if mode is None:
        return "online" if has_api_key(environ) else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"W&B mode {mode!r} (WANDB_MODE or logger.mode) must be one of {'|'.join(WANDB_MODES)}")
    if mode == "online" and not has_api_key(environ):
        return "offline"
    return mode


# --- histograms -------------------------------------------------------------------------------------


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict:
    """Counts and bin edges of the finite values (W&B's 64 bins); non-finite ones are only counted."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
    else:
        counts, edges = np.histogram(finite, bins=bins)
    return {"counts": counts.astype(int).tolist(), "bin_edges": edges.tolist(), "n": int(values.size),
            "n_nonfinite": int(values.size - finite.size), "mean": float(finite.mean()) if finite.size else None}


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
    return sorted(p for p in directory.rglob("*") if p.is_file()
                  and not any(part.startswith(".") or part == "wandb" for part in p.relative_to(directory).parts))


def _table_rows(table: Mapping[str, np.ndarray]) -> tuple[list[str], list[list]]:
    """Columns and rows of a per-feature table given as equal-length columns."""
    columns = list(table)
    arrays = [np.asarray(table[c]) for c in columns]
    lengths = {a.shape[0] if a.ndim else 1 for a in arrays}
    if len(lengths) > 1 or any(a.ndim != 1 for a in arrays):
        raise ValueError(f"table columns must be 1-D of equal length; got shapes "
                         f"{ {c: a.shape for c, a in zip(columns, arrays)} }")
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

    def log_artifact(self, name: str, type: str, directory: Path, *, table: Mapping[str, np.ndarray] | None = None,
                     table_name: str = "feature_stats", metadata: Mapping | None = None,
                     aliases: Sequence[str] = (), files: Sequence[str] | None = None) -> None:
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

    def log_artifact(self, name: str, type: str, directory: Path, *, table: Mapping[str, np.ndarray] | None = None,
                     table_name: str = "feature_stats", metadata: Mapping | None = None,
                     aliases: Sequence[str] = (), files: Sequence[str] | None = None) -> None:
        directory = Path(directory)
        paths = _artifact_files(directory, files)
        record = {"name": name, "type": type, "directory": str(directory.absolute()),
                  "files": [str(p.relative_to(directory)) for p in paths], "aliases": list(aliases),
                  "metadata": dict(metadata or {})}
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

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: Mapping, run_id: str | None = None,
                 name: str | None = None):
        super().__init__(run_dir)
        import wandb

        self._wandb = wandb
        sae = config.get("sae") if isinstance(config.get("sae"), Mapping) else {}
        self.sae_name, self.d_sae = sae.get("name"), sae.get("d_sae")
        mode = resolve_mode(cfg.mode)
        wandb_dir = Path(os.environ.get("WANDB_DIR") or self.run_dir).absolute()  # read per run: wandb caches it
        wandb_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {
            "project": cfg.project, "entity": cfg.entity, "group": cfg.group, "tags": list(cfg.tags) or None,
            "config": dict(config), "name": name, "id": run_id or _new_run_id(), "resume": "allow",
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
            warnings.warn(f"wandb: online start failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
                          f"logging offline instead as run {kwargs['id']}", RuntimeWarning, stacklevel=3)
            mode = "offline"
            self.run = wandb.init(mode=mode, **kwargs)
        self.mode = mode
        self.run_id = None if mode == "disabled" else self.run.id
        self._finished = False
        if mode == "offline":
            print(f"wandb: offline run {self.run.id} in {self.run.settings.sync_dir}; "
                  f"upload it with `wandb sync {self.run.settings.sync_dir}`", flush=True)
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
                np_histogram=(np.asarray(h["counts"]), np.asarray(h["bin_edges"])))
            if key == "feature_density_log10":  # SAELens's companions of its density histogram
                v = np.asarray(v, dtype=np.float64)
                payload["metrics/mean_log10_feature_sparsity"] = h["mean"] if h["mean"] is not None else float("nan")
                payload["sparsity/below_1e-5"] = int((v < -5).sum())
                payload["sparsity/below_1e-6"] = int((v < -6).sum())
        self.run.log(payload, step=int(step))

    def log_images(self, step: int | None, images: Mapping[str, Path]) -> None:
        payload = {key if "/" in key else f"images/{key}": self._wandb.Image(str(path)) for key, path in images.items()}
        self.run.log(payload, step=None if step is None else int(step))

    def log_artifact(self, name: str, type: str, directory: Path, *, table: Mapping[str, np.ndarray] | None = None,
                     table_name: str = "feature_stats", metadata: Mapping | None = None,
                     aliases: Sequence[str] = (), files: Sequence[str] | None = None) -> None:
        super().log_artifact(name, type, directory, table=table, table_name=table_name, metadata=metadata,
                             aliases=aliases, files=files)
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
            last = None
            for last in read_wandb_records(path):
                pass
            if last is not None and last.WhichOneof("record_type") == "exit":
                return True
        except (OSError, ValueError, struct.error):
            pass
        time.sleep(0.05)
    return False


def make_tracker(cfg: LoggerConfig, run_dir: Path, config: Mapping, run_id: str | None = None,
                 name: str | None = None) -> Tracker:
    """The run's tracker. `run_id`: None for a new run, or the W&B id saved in a checkpoint (resume)."""
    check_logger(cfg)
    if cfg.name == "none":
        return Tracker()
    if cfg.name == "jsonl":
        return JsonlTracker(run_dir)
    return WandbTracker(cfg, run_dir, config, run_id=run_id, name=name)


# --- toy-model runs ---------------------------------------------------------------------------------


def toy_settings_table(settings: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """One row per toy setting: the scalar fields every setting of metrics.json has."""
    keys = [k for k in settings[0] if all(isinstance(s.get(k), (int, float, str)) for s in settings)]
    return {"setting": np.arange(len(settings)), **{k: np.asarray([s[k] for s in settings]) for k in keys}}


def log_toy_run(run_dir: Path, cfg: LoggerConfig, config: Mapping | None = None) -> str | None:
    """Log a finished `toy-train` run: its figures (*.png) as images, results.npz + metrics.json as an
    artifact of type "toy_model" (per-setting table, aliases latest). Returns the W&B run id, if any."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    experiment = metrics.get("experiment", "toy")
    config = dict(config if config is not None else metrics.get("config", {}))
    tracker = make_tracker(cfg, run_dir, config, name=f"toy-{experiment}-{run_dir.name}")
    try:
        tracker.log_images(None, {p.stem: p for p in sorted(run_dir.glob("*.png"))})
        settings = metrics.get("settings") or []
        metadata = {k: metrics[k] for k in ("experiment", "n_settings", "n_instances", "seconds", "steps_per_s")
                    if k in metrics}
        tracker.log_artifact(f"toy-{experiment}", "toy_model", run_dir, files=["results.npz", "metrics.json"],
                             table=toy_settings_table(settings) if settings else None, table_name="settings",
                             metadata=metadata, aliases=["latest"])
    finally:
        tracker.finish()
    return tracker.run_id


# --- reading a .wandb file back (offline, no network) -------------------------------------------------

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
            run["artifacts"].append({
                "name": a.name, "type": a.type, "aliases": sorted(a.aliases),
                "metadata": json.loads(a.metadata) if a.metadata else {},
                "files": {c.path: c.local_path for c in a.manifest.contents},
            })
    return run


if __name__ == "__main__":  # python -m sae.tracking RUN.wandb: print a run's records as JSON
    for arg in sys.argv[1:]:
        print(json.dumps(read_wandb_run(Path(arg)), indent=1, default=str))
