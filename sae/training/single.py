"""One SAE trained on one stream of batches, on one device or sharded over a mesh of them (sae/parallel.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from sae import config as config_lib
from sae import parallel, tracking
from sae.checkpoint import CHECKPOINTS, Checkpointer
from sae.data import open_batch_source
from sae.outputs import check_space, check_writable, disk_errors
from sae.training.loop import Hooks, resume, run_steps
from sae.training.run_parts import (
    Instance,
    ProgressLog,
    RunHooks,
    finish,
    initial_parameters,
    loop_settings,
    run_meta,
    run_space,
    sae_for,
)
from sae.training.step import init_state, make_train_step


def _global_batches(
    source, batch_size: int, n_batches: int, seed: int, shardings, start_batch: int = 0
) -> Iterator[jax.Array]:
    """Batches start_batch .. n_batches − 1 of the source, placed on the mesh: each process contributes
    its rows of the global batch.

    A process-local source (an activation store) reads only this process's rows; others produce the
    whole batch on every process (the same seed), of which each process keeps its own slice.
    """
    if shardings is None:
        yield from source.train_batches(batch_size, n_batches, seed, start_batch)
        return
    n_proc, index = jax.process_count(), jax.process_index()
    local = batch_size // n_proc
    if n_proc == 1:  # one process: reshard on the devices, no trip through the host
        for x in source.train_batches(batch_size, n_batches, seed, start_batch):
            yield jax.device_put(x, shardings[1])
    elif source.process_local:
        for x in source.train_batches(local, n_batches, seed, start_batch):
            yield jax.tree.map(lambda a: parallel.global_batch(np.asarray(a), shardings[1]), x)
    else:
        part = slice(index * local, (index + 1) * local)
        for x in source.train_batches(batch_size, n_batches, seed, start_batch):
            yield jax.tree.map(lambda a: parallel.global_batch(np.asarray(a)[part], shardings[1]), x)


def train_single(cfg: config_lib.Config, out_dir: str | Path) -> dict:
    """Train one SAE as configured; returns the final metrics (also written to out_dir/metrics.json).
    Resumes from the run dir's newest checkpoint (or cfg.resume). cfg was checked by `train`."""
    parallel.initialize_distributed(cfg.mesh)
    trainer = cfg.trainer
    source = open_batch_source(cfg.data, trainer.batch_size, cfg.seed)
    out_dir = Path(out_dir).absolute()
    check_writable(out_dir, "the run directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    sae = sae_for(cfg.sae, source)
    start = initial_parameters(cfg, sae, source)
    n_steps, lr = start.n_steps, start.lr
    state = init_state(sae, start.params, start.tx, start.input_scale)
    mesh = parallel.make_mesh(cfg.mesh)
    shardings = None
    if mesh.size > 1:
        shardings = (
            parallel.state_shardings(state, sae.d_sae, mesh),
            parallel.batch_sharding(mesh),
            parallel.replicated(mesh),
        )
        state = jax.device_put(state, shardings[0])
    checkpointer = Checkpointer(out_dir / CHECKPOINTS, cfg.checkpoint)
    # A full or read-only disk, here or in orbax's writer thread: one line naming the last intact checkpoint.
    with disk_errors(out_dir, kept=checkpointer.intact), checkpointer:
        check_space(out_dir, run_space(checkpointer, state), "the run directory")
        state, done, saved, origin = resume(checkpointer, cfg.resume, out_dir, state, run_meta(cfg, sae.d_in, [])(0))
        train_step = make_train_step(
            sae,
            start.tx,
            start.schedule,
            n_steps,
            cfg.optim.sparsity_warmup_fraction,
            trainer.dead_tokens,
            shardings,
            trainer.compute_dtype,
        )
        lead = jax.process_index() == 0  # only process 0 logs, evaluates and exports
        hooks, trackers = Hooks(), []
        if lead:
            if source.ground_truth is not None:
                np.save(out_dir / "ground_truth.npy", np.asarray(source.ground_truth))
            print(
                f"training {cfg.sae.name} SAE: d_in={sae.d_in} d_sae={sae.d_sae} lr={lr:.3g} steps={n_steps} "
                f"batch={trainer.batch_size} mesh={dict(mesh.shape)} -> {out_dir}",
                flush=True,
            )
            run_ids = (saved or {}).get("wandb_run_ids") or [None]
            trackers = [tracking.make_tracker(cfg.logger, out_dir, config_lib.to_dict(cfg), run_id=run_ids[0])]
            log = ProgressLog(
                out_dir / "metrics.jsonl",
                n_steps,
                trainer.batch_size,
                resume_step=done,
                history=origin / "metrics.jsonl",
            )
            hooks = RunHooks([Instance(sae, cfg, out_dir, log, trackers[0])], source, stacked=False)
        try:
            state = run_steps(
                state,
                train_step,
                _global_batches(source, trainer.batch_size, n_steps, cfg.seed, shardings, done),
                first_step=done,
                n_steps=n_steps,
                checkpointer=checkpointer,
                meta=run_meta(cfg, sae.d_in, trackers),
                hooks=hooks,
                summaries=lambda s: (s.fire_counts, sae.decoder_norms(s.params)),
                **loop_settings(cfg),
            )
            checkpointer.wait()
            state = parallel.to_host(state)
            return finish(sae, cfg, state, state.buffers, source, out_dir, trackers[0]) if lead else {}
        finally:  # also when stopped (Ctrl-C, SIGTERM, an error): the log flushed, the W&B run closed for a resume
            hooks.close()
