"""Hydra entry points. `sae-train` and `python scripts/train_sae.py` are this same app.

User mistakes (bad config values, unreadable data) end the run with one line naming the field or
file and a non-zero exit status; Hydra itself rejects unknown keys and wrong types the same way.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sae import config as config_lib

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _train(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "TPU not found" at start-up
    from sae.data import DataError
    from sae.training import train

    try:
        typed = OmegaConf.to_object(cfg)
        train(typed, HydraConfig.get().runtime.output_dir)
    except (config_lib.ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def train() -> None:
    """Console script `sae-train`."""
    if not (CONF_DIR / "train.yaml").is_file():
        sys.exit(f"error: config directory {CONF_DIR} not found; install the project with `pip install -e .`")
    config_lib.register()
    hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=None)(_train)()
