"""Hydra app of `toy-train` (`python scripts/train_toy.py`): `main(after, run)` runs one experiment per job.

The console script lives in sae/cli.py, which passes `after` to log the finished run to the tracker
(`logger=`) and `run` to give the job sae's run record (.hydra/, cli.log, left as it was when refused),
its clean stop on Ctrl-C or SIGTERM and its one-line errors, since toy_models never imports sae.

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

# run(cfg, job) -> exit status: runs job(stop=...) and reports its failures; stop() gives the number of a
# signal asking the run to stop, or None (toy_models.experiment.run polls it between compiled calls).
Runner = Callable[[DictConfig, Callable[..., None]], int]


def run_plain(cfg: DictConfig, job: Callable[..., None]) -> int:
    """The runner without sae: a bad config value as one line (status 2); no signal handling, no record."""
    try:
        job()
    except config_lib.ToyConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _task(after: Callable[[config_lib.ToyConfig, str], None] | None, run: Runner) -> Callable[[DictConfig], None]:
    def task(cfg: DictConfig) -> None:
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no "generated new fontManager" note
        from toy_models.experiment import run as run_experiment

        typed, out_dir = OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir

        def job(stop: Callable[[], int | None] | None = None) -> None:
            run_experiment(typed, out_dir, stop=stop)
            if after is not None:
                after(typed, out_dir)

        status = run(cfg, job)
        if status:  # not sys.exit(0): a multirun goes on to its next job
            sys.exit(status)

    return task


def main(after: Callable[[config_lib.ToyConfig, str], None] | None = None, run: Runner | None = None) -> None:
    """Run the app; after(config, run dir) is called when a run has written its results; run(cfg, job)
    runs each job (run_plain by default). On a CPU every core becomes a device training a share of the
    instances."""
    from toy_models.train import use_all_cpu_cores

    use_all_cpu_cores()
    if not (CONF_DIR / "toy_train.yaml").is_file():
        sys.exit(f"error: config directory {CONF_DIR} not found; install the project with `pip install -e .`")
    config_lib.register()
    hydra.main(config_path=str(CONF_DIR), config_name="toy_train", version_base=None)(_task(after, run or run_plain))()
