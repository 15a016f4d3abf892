"""The step loop shared by single runs and sweeps: train steps, logging, checkpoints, resume, Ctrl-C and SIGTERM.

Nothing here waits on the device between steps except where a host value is needed: a log step's
metrics are fetched one step later (after the next step is queued), histograms every
`logger.histogram_every` steps and checkpoints every `checkpoint.every` steps read the state then.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sae import parallel
from sae.checkpoint import UNREADABLE, Checkpointer, Preempted, check_compatible, resume_source
from sae.errors import ConfigError
from sae.interrupts import StopSignals


def abstract(state: Any) -> Any:
    """The state's shapes, dtypes and shardings (where a restore puts the arrays)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def resume(
    checkpointer: Checkpointer, resume_from: str | None, run_dir: Path, state: Any, meta: dict
) -> tuple[Any, int, dict | None, Path]:
    """(state, steps already done, saved meta, the run dir it came from) from the checkpoint to resume,
    or (state, 0, None, run_dir) for a fresh start.

    meta: this run's meta (its config and d_in), which the checkpoint's must match (check_compatible).
    An explicit `resume=` that finds no readable checkpoint is a ConfigError naming what it found.
    """
    source = resume_source(resume_from, run_dir)
    if source is None:
        return state, 0, None, run_dir
    directory, step = source
    reader = (
        checkpointer
        if directory == checkpointer.directory
        else Checkpointer(directory, checkpointer.cfg, read_only=True)
    )
    try:
        restored = reader.restore(abstract(state), lambda saved, path: check_compatible(saved, meta, path), step)
    finally:
        if reader is not checkpointer:
            reader.close()
    if restored is None and resume_from is not None:
        raise ConfigError(f"resume={resume_from!r}: {_found(directory, reader.set_aside)}")
    if restored is None:
        return state, 0, None, run_dir
    if jax.process_index() == 0:
        print(f"resuming from {restored.path} (step {restored.step})", flush=True)
    return restored.state, restored.step, restored.meta, directory.parent


def _found(directory: Path, set_aside: list[Path]) -> str:
    """What a checkpoints/ directory holds when none of it can be restored (for resume='s error)."""
    entries = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    found = f"{directory} holds no readable checkpoint"
    if set_aside:
        found += f" (set aside as damaged or unreadable: {', '.join(str(p) for p in set_aside)})"
    elif entries:
        found += f" (found only: {', '.join(entries[:8])}{' ...' if len(entries) > 8 else ''})"
    else:
        found += " (it is empty)"
    return found + f"; see {directory.parent / UNREADABLE} for steps set aside, or drop resume= to start afresh"


class Hooks:
    """What the loop calls on the host (process 0's are real; other processes pass no-ops).

    log(step, metrics): a log step's metrics as host floats (per instance for a sweep);
    histograms(step, fire_counts, decoder_norms, window_tokens): every histogram_every steps, the firing
        counts over the last window of window_tokens tokens and the decoder rows' norms ([.., d_sae] each);
    checkpointed(step, host_state, metrics, best): after each checkpoint, with the state on the host when
        run_steps was asked for dictionaries (else None) and whether it is the best so far;
    close(): at the end of the run, however it ends.
    """

    def log(self, step: int, metrics: dict) -> None: ...

    def histograms(self, step: int, fire_counts: np.ndarray, decoder_norms: np.ndarray, window_tokens: int) -> None: ...

    def checkpointed(self, step: int, host_state: Any, metrics: dict, best: bool) -> None: ...

    def close(self) -> None:
        """Flush and close logs and trackers (also when the run stops early)."""


def run_steps(
    state: Any,
    train_step: Callable[[Any, jax.Array], tuple[Any, dict]],
    batches: Iterable[jax.Array],
    *,
    first_step: int,
    n_steps: int,
    batch_size: int,
    log_every: int,
    histogram_every: int,
    checkpoint_every: int,
    checkpointer: Checkpointer,
    meta: Callable[[int], dict],
    hooks: Hooks,
    summaries: Callable[[Any], tuple[jax.Array, jax.Array]],
    dictionaries: bool = False,
) -> Any:
    """Steps first_step+1 .. n_steps on `batches`; saves a checkpoint every checkpoint_every steps and at
    the end; on Ctrl-C (SIGINT) or SIGTERM saves the step reached and raises Preempted (a second Ctrl-C
    aborts at once). Returns the final state.

    meta(step): the checkpoint's JSON; summaries(state): (firing counters [.., d_sae] uint32, decoder
    norms [.., d_sae]) on the device; dictionaries: bring the state to the host at checkpoints for
    hooks.checkpointed. Every process runs this (the host copies are collectives); only process 0's
    hooks do anything.
    """
    summarise = jax.jit(summaries)
    pending = None  # (step, device metrics) of the last log step, fetched after the next step is queued
    window = (first_step, np.asarray(parallel.to_host(summarise(state)[0])))

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            hooks.log(pending[0], jax.device_get(pending[1]))
        pending = None

    def save(step: int, state: Any, metrics: dict) -> None:
        host = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        checkpointer.save(step, state, meta(step), host)
        host_state = parallel.to_host(state) if dictionaries else None
        hooks.checkpointed(step, host_state, host, checkpointer.best_step() == step)

    step, metrics = first_step, None
    # One process: our flag, set by SIGINT or SIGTERM. Several: JAX's preemption service (started by
    # jax.distributed) takes SIGTERM and names a step every process reaches, so all of them save the same one.
    multi_process = jax.process_count() > 1
    with StopSignals(install=not multi_process, what="training") as stop:
        for step, x in enumerate(batches, start=first_step + 1):
            state, metrics = train_step(state, x)
            flush()
            if step % log_every == 0 or step == n_steps:
                pending = (step, metrics)
            if step % histogram_every == 0:
                counts, norms = parallel.to_host(summarise(state))
                hooks.histograms(step, counts - window[1], norms, (step - window[0]) * batch_size)
                window = (step, counts)
            if stop.requested or (multi_process and checkpointer.manager.reached_preemption(step)):
                flush()
                save(step, state, metrics)
                checkpointer.wait()
                raise Preempted(step, checkpointer.directory, stop.requested or signal.SIGTERM)
            if checkpoint_every and step % checkpoint_every == 0 and step < n_steps:
                save(step, state, metrics)
    flush()
    if metrics is not None:
        save(step, state, metrics)
    checkpointer.wait()
    return state


def scratch_dir(run_dir: Path) -> tempfile.TemporaryDirectory:
    """A temporary folder beside the run (same file system) for exports handed to the tracker."""
    return tempfile.TemporaryDirectory(dir=run_dir, prefix=".export-")
