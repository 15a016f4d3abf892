"""Hydra entry points. `sae-train` and `python scripts/train_sae.py` are this same app; `toy-sae`
(`python scripts/toy_sae.py`) trains SAEs on a toy model's activations; `sae-cache`
(`python scripts/cache_activations.py`) writes an activation store.

User mistakes (bad config values, unreadable data, a key the schema lacks however it is given) end the
run with one line naming the field or file and a non-zero exit status. Every schema is registered with
Hydra here (`register_schemas`), from the registries of families and sources, so no table lists them.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sae import config as config_lib
from sae.architectures import FAMILIES
from sae.data import BATCH_SOURCES, ROW_SOURCES
from sae.errors import ConfigError, DataError, require
from sae.inspect.config import InspectConfig
from sae.lm.config import LMTrainConfig
from sae.outputs import OutputError, OutputRefused, check_writable
from sae.overrides import check_overrides, parse_command_line
from sae.run_record import RunRecord

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore, so conf/**.yaml can extend them (`defaults: [<name>_schema]`)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=config_lib.Config)
    cs.store(name="cache_schema", node=config_lib.CacheConfig)
    cs.store(name="lm_train_schema", node=LMTrainConfig)
    cs.store(name="inspect_schema", node=InspectConfig)
    cs.store(group="mesh", name="mesh_schema", node=config_lib.MeshConfig)
    cs.store(group="logger", name="logger_schema", node=config_lib.LoggerConfig)
    for group, entries in (
        ("sae", [(n, f.config) for n, f in FAMILIES.items()]),
        ("data", [(n, e.schema) for n, e in BATCH_SOURCES.items()]),
        ("source", [(n, e.schema) for n, e in ROW_SOURCES.items()]),
    ):
        for name, schema in entries:
            cs.store(group=group, name=f"{name}_schema", node=schema)


def _check_command_line(config_name: str) -> None:
    """`--help`: the tool's own groups and keys (sae/help.py), exit 0. Otherwise one line and exit status 2
    for a flag or an override the config cannot take (sae/overrides.py), before Hydra sees the command line."""
    from sae.help import print_help, tool_help

    try:
        args = parse_command_line(sys.argv[1:])
        if args.config_path or args.config_dir:
            return  # another config search path: left to Hydra
        if args.config_name:
            configs = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
            require(args.config_name in configs, f"--config-name {args.config_name}: not one of {', '.join(configs)}")
            config_name = args.config_name
        if args.help:
            print_help(tool_help(CONF_DIR, config_name, args.overrides))
            sys.exit(0)
        check_overrides(CONF_DIR, config_name, args.overrides, multirun=args.multirun)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _record_files(cfg: DictConfig) -> dict[str, str]:
    """The .hydra/ files Hydra would have written (its own writing is off: sae/run_record.py)."""
    hydra_cfg = HydraConfig.instance().cfg
    return {
        ".hydra/config.yaml": OmegaConf.to_yaml(cfg),
        ".hydra/hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
        ".hydra/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task),
    }


def run_in_record(cfg: DictConfig, job: Callable[[], object]) -> int:
    """run_job(job) with the run's record (.hydra/, cli.log) in Hydra's output dir; a refused run (a user
    mistake, status 2) leaves that directory as it was."""
    record = RunRecord(HydraConfig.get().runtime.output_dir, _record_files(cfg))
    status = run_job(record.open)
    if status:
        return status
    status = 1  # what a crash leaves: the record kept
    try:
        status = run_job(job)
    finally:
        record.close(refused=status == 2)
    return status


def _run(job: Callable[[config_lib.Config, str], object], record: bool) -> Callable[[DictConfig], None]:
    """A Hydra task running job(typed config, output dir), with user mistakes reported in one line; with
    `record`, the output dir gets the run's record (run_in_record)."""

    def task(cfg: DictConfig) -> None:
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "TPU not found" at start-up
        # orbax's notes ("directory is read only") and, after a failed save, its writer tasks' errors: the job
        # reports that failure in one line (absl is orbax's logger; asyncio logs its unretrieved futures)
        for name in ("absl", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger().setLevel(logging.WARNING)  # nor any library's, through Hydra's console handler
        try:
            typed = OmegaConf.to_object(cfg)
        except MissingMandatoryValue as err:  # a `???` left in the yaml, e.g. data.path
            print(
                f"error: {err.full_key} is required: give it on the command line as {err.full_key}=...", file=sys.stderr
            )
            sys.exit(2)
        run = lambda: job(typed, HydraConfig.get().runtime.output_dir)
        status = run_in_record(cfg, run) if record else run_job(run)
        if status:  # not sys.exit(0): a multirun goes on to its next job
            sys.exit(status)

    return task


def run_job(job: Callable[[], object]) -> int:
    """Run a tool's job and return its exit status, every expected failure reported in one line: a user
    mistake or an output refused before any work (2), an output failing mid-job (1), a clean stop on a
    signal (128 + n, the message saying what was kept), a second Ctrl-C (130)."""
    from sae.interrupts import Interrupted, exit_status

    sys.unraisablehook = _quiet_after_a_failed_write
    try:
        job()
    except OutputRefused as err:  # before any work: as a refused input
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        # orbax's writer coroutines of the failed save, never awaited, would warn as they are collected
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        return 1
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        return exit_status(stop.signum)
    except KeyboardInterrupt:
        print("aborted by Ctrl-C: the work since the last save is lost", file=sys.stderr)
        return exit_status(signal.SIGINT)
    return 0


def _quiet_after_a_failed_write(unraisable) -> None:
    """When a checkpoint's write fails (the job reports it in one line), orbax's writer tasks still pending
    on that save find their event loop closed, and Python would print each as a traceback. Anything else
    is printed as usual."""
    if not (unraisable.exc_type is RuntimeError and "Event loop is closed" in str(unraisable.exc_value)):
        sys.__unraisablehook__(unraisable)


def _check_run_dir(config_name: str) -> None:
    """One line and exit status 2 when Hydra could not make the run directory (it would print a traceback)."""
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    overrides = [a for a in sys.argv[1:] if a.startswith("hydra.") and "=" in a]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        hydra_cfg = compose(config_name, overrides=overrides, return_hydra_config=True).hydra
    try:
        check_writable(hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir, "the run directory")
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _main(config_name: str, job: Callable[[config_lib.Config, str], object], record: bool = True) -> None:
    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        sys.exit(f"error: config directory {CONF_DIR} not found; install the project with `pip install -e .`")
    register_schemas()
    _check_command_line(config_name)
    if record:
        _check_run_dir(config_name)
    hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)(_run(job, record))()


def train() -> None:
    """Console script `sae-train`."""
    from sae.training import train as train_sae

    _main("train", train_sae)


def toy_train() -> None:
    """Console script `toy-train` (toy_models/cli.py): a toy-models experiment, then its figures and
    results to the tracker when `logger=wandb`."""
    from sae.interrupts import Interrupted, StopSignals, signal_name
    from sae.outputs import disk_errors
    from sae.tracking import log_toy_run
    from toy_models import cli as toy_cli
    from toy_models import config as toy_config
    from toy_models.experiment import Stopped

    def log(cfg, out_dir: str) -> None:
        if cfg.logger is not None and cfg.logger.name == "wandb":
            log_toy_run(Path(out_dir), cfg.logger)

    def run(cfg: DictConfig, job: Callable[..., None]) -> int:
        """The job in the run's record, stopping cleanly on Ctrl-C / SIGTERM, its failures in one line."""
        out_dir = HydraConfig.get().runtime.output_dir

        def guarded() -> None:
            kept = "this run's results are incomplete; free some space and run the same command again"
            with StopSignals(what="toy-train") as stop, disk_errors(out_dir, kept=kept):
                try:
                    job(stop=lambda: stop.requested)
                except toy_config.ToyConfigError as err:
                    raise ConfigError(str(err)) from None
                except Stopped as err:
                    raise Interrupted(str(err), err.signum) from None
            if stop.requested:  # during the analysis or the figures, after the training: all of it was written
                name = signal_name(stop.requested)
                raise Interrupted(
                    f"stopped by {name} once the run had finished: its results are in {out_dir}", stop.requested
                )

        return run_in_record(cfg, guarded)

    register_schemas()
    toy_config.register()
    _check_command_line("toy_train")
    _check_run_dir("toy_train")
    toy_cli.main(after=log, run=run)


def toy_sae() -> None:
    """Console script `toy-sae`: one SAE per setting of a toy-train run (sae/toy_sae.py)."""
    from sae.toy_sae import train_per_setting

    _main("toy_sae", train_per_setting)


def cache() -> None:
    """Console script `sae-cache`: write an activation store from a source (sae/cache.py)."""
    from sae.cache import cache as cache_store

    _main("cache", cache_store, record=False)  # writes only into out


def inspect() -> None:
    """Console script `sae-inspect`: feature statistics, examples, plots and the HTML browser (sae/inspect/)."""
    from sae.inspect.run import inspect_run

    # `data` is an open dict of overrides of the run's saved data config: let `data.path=X` add a key
    # (Hydra's struct mode would ask for `+data.path=X`); unknown keys are rejected by inspect_run.
    sys.argv = [f"+{a}" if a.startswith("data.") else a for a in sys.argv]
    _main("inspect", lambda cfg, _output_dir: inspect_run(cfg), record=False)  # writes only into out


def lm_train() -> None:
    """Console script `lm-train`: train the small transformer LM on a text corpus (sae/lm/train.py)."""
    from sae.lm.train import train_lm

    _main("lm_train", train_lm)
