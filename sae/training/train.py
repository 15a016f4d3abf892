"""`train(cfg, out_dir)`: what `sae-train` runs; it needs no Hydra, so notebooks call it directly.

Writes under out_dir: metrics.jsonl (one line per log interval), checkpoints/ (orbax), metrics.json
(final held-out evaluation), sae/ (SAELens-format export), ground_truth.npy (when the data has true
features), and the tracker's files (histograms.jsonl, wandb/). With `sweep.key` set, every value of the
sweep is trained in one pass, each in a run directory of its own under out_dir (sae/training/sweep.py).
"""

from __future__ import annotations

from pathlib import Path

from sae import config as config_lib
from sae.training.single import train_single
from sae.training.sweep import train_sweep


def train(cfg: config_lib.Config, out_dir: str | Path) -> dict:
    """Train as configured; returns the final metrics ({label: metrics} for a sweep)."""
    config_lib.check(cfg)
    return train_single(cfg, out_dir) if cfg.sweep.key is None else train_sweep(cfg, out_dir)
