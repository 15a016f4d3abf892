"""Orbax checkpoints of a training run: save, resume from the newest good one, stop cleanly on SIGTERM.

A checkpoint is `<run dir>/checkpoints/<step>/` holding two items:
  state  the training state pytree (params, Adam moments and count, buffers, dead-latent and firing
         counters, step), restored with the run's own shardings, so a run on a mesh resumes on it;
  meta   JSON: step, tokens seen, the data position (batches consumed: every source is a function of
         (seed, batch index), so this is its whole RNG state), the config, the W&B run id.
The lr and sparsity-warm-up schedules are functions of the step counts inside `state`.

Saves are asynchronous (orbax copies the arrays off the device, then writes in a background thread)
and land in `<step>.orbax-checkpoint-tmp` until committed by a rename, so a killed run never leaves a
half-written checkpoint where a restore looks. The latest `keep` are kept, plus the best by a logged
metric. A checkpoint that fails to read back is moved to `checkpoints.unreadable/` (never deleted) with a
warning, and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from sae.config import CheckpointConfig
from sae.errors import ConfigError

CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints.unreadable"
# Config fields that fix the shapes or meaning of the saved state: a checkpoint that differs refuses to load.
MUST_MATCH = ("sae.name", "sae.d_sae", "d_in", "trainer.param_dtype", "sweep.key", "sweep.values")
# Where and how a run is launched, not what it trains: free to change on resume (the state is resharded).
NOT_COMPARED = ("resume", "mesh.")


class CheckpointMismatch(ConfigError):
    """A checkpoint made by a differently configured run; the message lists what differs."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint of the step reached was written; rerunning the command resumes."""

    def __init__(self, step: int, directory: Path):
        super().__init__(
            f"stopped by SIGTERM at step {step}; checkpoint saved in {directory}/{step}; "
            "run the same command again to resume"
        )
        self.step, self.directory = step, directory


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    meta: dict
    path: Path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def check_compatible(saved: dict, current: dict, where: Path) -> None:
    """Refuse a checkpoint whose shape-defining fields differ (CheckpointMismatch); warn about other changes.

    saved, current: the `meta` dicts, {"config": ..., "d_in": ...}.
    """
    old = _flatten({**saved["config"], "d_in": saved["d_in"]})
    new = _flatten({**current["config"], "d_in": current["d_in"]})
    differs = sorted(
        key for key in old.keys() | new.keys() if old.get(key) != new.get(key) and not key.startswith(NOT_COMPARED)
    )
    fatal = [key for key in differs if key in MUST_MATCH]
    if fatal:
        raise CheckpointMismatch(
            f"checkpoint {where} was made with a different SAE: "
            + ", ".join(f"{key}={old.get(key)!r} there but {new.get(key)!r} here" for key in fatal)
            + "; start in a new run directory, or set the same values to resume"
        )
    if differs:
        warnings.warn(
            f"resuming from {where} with changed settings: "
            + ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in differs),
            stacklevel=2,
        )


class Checkpointer:
    """Save and restore a run's checkpoints under `directory` (made absolute; orbax needs that)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        policies = [preservation.LatestN(n=cfg.keep)]
        if cfg.best_metric is not None:
            metric = cfg.best_metric
            policies.append(
                preservation.BestN(
                    get_metric_fn=lambda metrics: metrics[metric],
                    n=1,
                    reverse=cfg.best_mode == "min",
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict[str, float] | None = None) -> None:
        """Start saving `state` and `meta` as checkpoint `step`; returns once the arrays are off the device."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.cfg.best_metric is not None else None

    def restore(
        self, abstract_state: Any, check_meta: Callable[[dict, Path], None], step: int | None = None
    ) -> Restored | None:
        """The newest checkpoint (or `step`) that reads back whole, or None when there is none.

        abstract_state: a pytree of jax.ShapeDtypeStruct with shardings (where the arrays go).
        check_meta(meta, path) may raise to refuse a checkpoint (a CheckpointMismatch propagates);
        an unreadable checkpoint is moved to checkpoints.unreadable/ with a warning, and the one before used.
        """
        for candidate in [step] if step is not None else reversed(self.steps()):
            path = self.directory / str(candidate)
            try:
                meta = self.manager.restore(candidate, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as err:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                self._set_aside(path, err)
                continue
            check_meta(meta, path)
            try:
                state = self.manager.restore(
                    candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                ).state
            except Exception as err:  # noqa: BLE001
                self._set_aside(path, err)
                continue
            return Restored(candidate, state, meta, path)
        return None

    def _set_aside(self, path: Path, err: Exception) -> None:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if jax.process_index() == 0 and path.exists():
            target = path.parent.parent / UNREADABLE / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            shutil.move(path, target)
            warnings.warn(
                f"checkpoint {path} is unreadable ({reason}); moved it to {target} and fell back to the previous one",
                stacklevel=3,
            )
        else:
            warnings.warn(f"checkpoint {path} is unreadable ({reason}); falling back to the previous one", stacklevel=3)
        self.manager.reload()

    def wait(self) -> None:
        """Block until every started save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def resume_source(resume: str | None, run_dir: Path) -> tuple[Path, int | None] | None:
    """Where a run resumes from: (checkpoints dir, step or None for the newest), or None for a fresh start.

    resume: null (the run dir's own checkpoints, if any), or a path to a run dir, its checkpoints/ dir,
    or one step's dir inside it.
    """
    if resume is None:
        own = run_dir / CHECKPOINTS
        return (own, None) if own.is_dir() else None
    path = Path(resume).expanduser().absolute()
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    if path.is_dir() and path.name.isdigit() and (path / "state").exists():
        return path.parent, int(path.name)
    if path.is_dir() and path.name == CHECKPOINTS:
        return path, None
    raise ConfigError(
        f"resume={resume!r}: not a run directory with checkpoints/, a checkpoints/ directory, "
        "or one checkpoint step's directory"
    )


class StopOnSigterm:
    """Context: SIGTERM (a pre-emption notice) sets `requested` instead of killing the process.

    The loop checks the flag between steps, writes a checkpoint and stops. Only the main thread can
    install signal handlers; elsewhere (a notebook's worker thread), or with install=False, this does nothing.
    """

    def __init__(self, install: bool = True):
        self.requested = False
        self._install = install
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self):
        if self._install and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def sigterm_exit_status() -> int:
    """The shell's status for a process ended by SIGTERM (128 + 15), used after a pre-emption checkpoint."""
    return 128 + signal.SIGTERM.value if os.name == "posix" else 1
