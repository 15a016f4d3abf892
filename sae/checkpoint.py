"""Orbax checkpoints of a training run: save, seal, resume from the newest good one, stop cleanly on a signal.

A checkpoint is `<run dir>/checkpoints/<step>/` holding two items:
  state  the training state pytree (params, Adam moments and count, buffers, dead-latent and firing
         counters, step), restored with the run's own shardings, so a run on a mesh resumes on it;
  meta   JSON: step, tokens seen, the data position (batches consumed: every source is a function of
         (seed, batch index), so this is its whole RNG state), the config, the W&B run id.
The lr and sparsity-warm-up schedules are functions of the step counts inside `state`.

Saves are asynchronous (orbax copies the arrays off the device, then writes in a background thread)
and land in `<step>.orbax-checkpoint-tmp` until committed by a rename, so a killed run never leaves a
half-written checkpoint where a restore looks. Once a step is committed its files' BLAKE2b digests are
written last, to `<step>/digest.json` (the step is "sealed"), and a restore verifies them first. The latest
`keep` are kept, plus the best by a logged metric. A checkpoint whose files differ from their digests, or
that fails to read back, is moved to `checkpoints.unreadable/` (never deleted) with a warning naming the
file, and the previous one is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from sae.config import CheckpointConfig
from sae.data.store import checksum
from sae.errors import ConfigError
from sae.interrupts import Interrupted, signal_name
from sae.outputs import write_atomic

CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints.unreadable"
DIGEST = "digest.json"
# Config fields that fix the shapes or meaning of the saved state: a checkpoint that differs refuses to load.
MUST_MATCH = ("sae.name", "sae.d_sae", "d_in", "trainer.param_dtype", "sweep.key", "sweep.values")
# Where and how a run is launched, not what it trains: free to change on resume (the state is resharded).
NOT_COMPARED = ("resume", "mesh.")


class CheckpointMismatch(ConfigError):
    """A checkpoint made by a differently configured run; the message lists what differs."""


class Preempted(Interrupted):
    """SIGINT or SIGTERM arrived: a checkpoint of the step reached was written; rerunning the command resumes."""

    def __init__(self, step: int, directory: Path, signum: int):
        super().__init__(
            f"stopped by {signal_name(signum)} at step {step}; checkpoint saved in {directory}/{step}; "
            "run the same command again to resume",
            signum,
        )
        self.step, self.directory = step, directory


def file_digests(step_dir: Path) -> dict[str, str]:
    """{path relative to step_dir: BLAKE2b digest} of every file of a checkpoint step but its digest file."""
    return {
        str(path.relative_to(step_dir)): checksum(path)
        for path in sorted(step_dir.rglob("*"))
        if path.is_file() and path.name != DIGEST
    }


def damage(step_dir: Path) -> str | None:
    """What differs between a sealed step's files and its digest.json (None when they agree or when the
    step has no digest: one killed between its commit and its seal, or written before digests existed)."""
    sealed = step_dir / DIGEST
    if not sealed.is_file():
        return None
    try:
        expected = json.loads(sealed.read_text())
    except (OSError, ValueError):
        return f"its {DIGEST} is unreadable"
    found = file_digests(step_dir)
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            return f"{name} is missing"
        if name not in expected:
            return f"{name} is not in its {DIGEST}"
        if found[name] != expected[name]:
            return f"{name} differs from its digest"
    return None


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
        self._unsealed: list[int] = []  # steps saved here whose digests are not written yet
        self.set_aside: list[Path] = []  # where restore moved the damaged and unreadable steps

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict[str, float] | None = None) -> None:
        """Start saving `state` and `meta` as checkpoint `step`; returns once the arrays are off the device.

        The previous save is committed and sealed first (orbax waits for it before starting another anyway).
        """
        self.wait()
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Write digest.json into every committed step this run saved (process 0; the files are final)."""
        if jax.process_index() == 0:
            for step in self._unsealed:
                step_dir = self.directory / str(step)
                if step_dir.is_dir():  # not already removed by the preservation policy
                    write_atomic(step_dir / DIGEST, json.dumps(file_digests(step_dir), indent=1).encode())
        self._unsealed = []

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
            problem = damage(path)
            if problem is not None:
                self._set_aside(path, problem, "damaged")
                continue
            if not (path / DIGEST).is_file():
                warnings.warn(
                    f"checkpoint {path} has no {DIGEST} (its run stopped before sealing it, or an older version "
                    "wrote it): restoring it unverified",
                    stacklevel=2,
                )
            try:
                meta = self.manager.restore(candidate, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as err:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                self._set_aside(path, _first_line(err))
                continue
            check_meta(meta, path)
            try:
                state = self.manager.restore(
                    candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                ).state
            except Exception as err:  # noqa: BLE001
                self._set_aside(path, _first_line(err))
                continue
            return Restored(candidate, state, meta, path)
        return None

    def _set_aside(self, path: Path, reason: str, what: str = "unreadable") -> None:
        if jax.process_index() == 0 and path.exists():
            target = path.parent.parent / UNREADABLE / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            shutil.move(path, target)
            self.set_aside.append(target)
            warnings.warn(
                f"checkpoint {path} is {what} ({reason}); moved it to {target} and fell back to the previous one",
                stacklevel=3,
            )
        else:
            warnings.warn(f"checkpoint {path} is {what} ({reason}); falling back to the previous one", stacklevel=3)
        self.manager.reload()

    def wait(self) -> None:
        """Block until every started save is committed, then seal them."""
        self.manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        """Commit and seal what was started, then stop orbax's threads (also after an error: nothing of
        orbax's may outlive the run and print into the user's terminal)."""
        try:
            self.wait()
        finally:
            # orbax's close() does not wait for the clean-up of old tmp folders it starts on opening: a run
            # that fails at once would leave that thread printing a traceback at interpreter exit.
            getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
            self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:  # the run failed: stop orbax's threads; a save failing again (the full disk) adds nothing
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def space_needed(self, state: Any) -> int:
        """Bytes this run's checkpoints may still need on disk: `keep` of them, the best, and one being
        written, each the size of `state`, less what its checkpoints already take."""
        per_step = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        steps = [p for p in self.directory.glob("*") if p.name.isdigit()] if self.directory.is_dir() else []
        return max(per_step * (self.cfg.keep + 2) - sum(map(_bytes_under, steps)), 0)

    def intact(self) -> str:
        """What survives a failed save, for its error message: the newest committed step, or none."""
        steps = [int(p.name) for p in self.directory.glob("*") if p.name.isdigit()] if self.directory.is_dir() else []
        if not steps:
            return "no checkpoint was complete yet; free space and run the same command again"
        return (
            f"the last complete checkpoint, {self.directory / str(max(steps))}, is intact; "
            "free space and run the same command again to resume"
        )


def _bytes_under(directory: Path) -> int:
    """The size of the files below `directory`, counting none that vanish meanwhile (orbax's clean-up)."""
    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


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
