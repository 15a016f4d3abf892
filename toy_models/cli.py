"""Hydra entry point. `toy-train` and `python scripts/train_toy.py` are this same app.

A bad config value ends the run with one line naming the field and exit status 2; Hydra itself
rejects unknown keys and wrong types the same way.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from toy_models import config as config_lib

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _train(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from toy_models.experiment import run

    try:
        run(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)
    except config_lib.ToyConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def train() -> None:
    """Console script `toy-train`; on a CPU every core becomes a device training a share of the instances."""
    from toy_models.train import use_all_cpu_cores

    use_all_cpu_cores()
    if not (CONF_DIR / "toy_train.yaml").is_file():
        sys.exit(f"error: config directory {CONF_DIR} not found; install the project with `pip install -e .`")
    config_lib.register()
    hydra.main(config_path=str(CONF_DIR), config_name="toy_train", version_base=None)(_train)()
