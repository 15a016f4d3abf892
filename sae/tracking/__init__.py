"""Experiment tracking: W&B (offline without an API key), JSONL in the run directory, or nothing.

trackers.py: the trackers and `make_tracker`; names.py: our metric keys under SAELens's W&B names;
mode.py: which W&B mode a run gets; wandb_file.py: a `.wandb` file read back offline; toy.py: a
toy-train run to the tracker.
"""

from sae.config import LoggerConfig
from sae.tracking.mode import has_api_key, resolve_mode
from sae.tracking.names import SAELENS_NAMES, WANDB_NAMES, to_wandb_metrics, wandb_name
from sae.tracking.toy import log_toy_run, toy_settings_table
from sae.tracking.trackers import JsonlTracker, Tracker, WandbTracker, histogram, make_tracker
from sae.tracking.wandb_file import read_wandb_records, read_wandb_run

__all__ = [
    "JsonlTracker",
    "LoggerConfig",
    "SAELENS_NAMES",
    "Tracker",
    "WANDB_NAMES",
    "WandbTracker",
    "has_api_key",
    "histogram",
    "log_toy_run",
    "make_tracker",
    "read_wandb_records",
    "read_wandb_run",
    "resolve_mode",
    "to_wandb_metrics",
    "toy_settings_table",
    "wandb_name",
]
