"""Hydra app of `toy-train` (`python scripts/train_toy.py`): `main(after)` runs one experiment per job.

The console script lives in sae/cli.py, which passes `after` to log the finished run to the tracker
(`logger=`), since toy_models never imports sae.

A bad config value ends the run with one line naming the field and exit status 2; Hydra itself
rejects unknown keys and wrong types the same way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from toy_models import config as config_lib

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _task(after: Callable[[config_lib.ToyConfig, str], None] | None) -> Callable[[DictConfig], None]:
    def task(cfg: DictConfig) -> None:
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        from toy_models.experiment import run

        typed, out_dir = OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir
        try:
            run(typed, out_dir)
        except config_lib.ToyConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        if after is not None:
            after(typed, out_dir)

    return task


def main(after: Callable[[config_lib.ToyConfig, str], None] | None = None) -> None:
    """Run the app; after(config, run dir) is called when a run has written its results. On a CPU every
    core becomes a device training a share of the instances."""
    from toy_models.train import use_all_cpu_cores

    use_all_cpu_cores()
    if not (CONF_DIR / "toy_train.yaml").is_file():
        sys.exit(f"error: config directory {CONF_DIR} not found; install the project with `pip install -e .`")
    config_lib.register()
    hydra.main(config_path=str(CONF_DIR), config_name="toy_train", version_base=None)(_task(after))()
