"""A finished `toy-train` run to the tracker: its figures as images, its results as an artifact."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sae.config import LoggerConfig
from sae.tracking.trackers import make_tracker


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
        metadata = {
            k: metrics[k] for k in ("experiment", "n_settings", "n_instances", "seconds", "steps_per_s") if k in metrics
        }
        tracker.log_artifact(
            f"toy-{experiment}",
            "toy_model",
            run_dir,
            files=["results.npz", "metrics.json"],
            table=toy_settings_table(settings) if settings else None,
            table_name="settings",
            metadata=metadata,
            aliases=["latest"],
        )
    finally:
        tracker.finish()
    return tracker.run_id
