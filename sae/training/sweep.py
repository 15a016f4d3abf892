"""A sweep trained in one pass: `sae-train sweep.key=sae.k sweep.values=[16,32,64]`.

The instances share everything but the swept value: the batches (read and moved once), the geometric-
median b_dec and the initialisation seed. One compiled step trains them all (dictionary_learning's
pattern): their states are stacked on an instance axis, split over the `mesh`'s devices (values must
divide evenly), and each device trains its instances one after another (`make_sweep_step`). A sweep over
k builds the TopK SAE with the largest k and keeps each instance's own k largest (`topk.keep_first_k`, k
held in its buffers); coefficient sweeps pass each instance's λ. Each instance ends as a run directory of its own under
out_dir/<key>=<value>/ (metrics.jsonl, metrics.json, sae/), identical to a separate `sae-train` run with
that value, and out_dir/sweep.json lists them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sae import config as config_lib
from sae import parallel, tracking
from sae.checkpoint import CHECKPOINTS, Checkpointer
from sae.data import open_batch_source
from sae.errors import ConfigError
from sae.outputs import check_space, check_writable, disk_errors, write_atomic
from sae.training.loop import resume, run_steps
from sae.training.run_parts import (
    Instance,
    ProgressLog,
    RunHooks,
    export_buffers,
    finish,
    initial_parameters,
    loop_settings,
    run_meta,
    run_space,
    sae_for,
)
from sae.training.step import init_state, make_sweep_step, pure_train_step


def instance_configs(cfg: config_lib.Config) -> list[config_lib.Config]:
    """One plain (sweep-less) config per swept value."""
    field_name = cfg.sweep.key.split(".", 1)[1]
    configs = []
    for value in cfg.sweep.values:
        one = copy.deepcopy(cfg)
        one.sweep = config_lib.SweepConfig()
        setattr(one.sae, field_name, int(value) if field_name == "k" else float(value))
        configs.append(one)
    return configs


def train_sweep(cfg: config_lib.Config, out_dir: str | Path) -> dict:
    """Train every instance of the sweep; returns {label: final metrics} (also out_dir/sweep.json). cfg was
    checked by `train`; each instance's config is checked here."""
    if jax.process_count() > 1:
        raise ConfigError("sweeps run in one process (over its devices): start one per host")
    devices = parallel.make_mesh(cfg.mesh).devices.reshape(-1)
    if len(cfg.sweep.values) % len(devices):
        raise ConfigError(
            f"sweep.values has {len(cfg.sweep.values)} values, which must divide over the "
            f"mesh's {len(devices)} devices (set mesh.data / mesh.model to fewer)"
        )
    configs = instance_configs(cfg)
    for one in configs:
        config_lib.check(one)
    trainer, out_dir = cfg.trainer, Path(out_dir).absolute()
    check_writable(out_dir, "the run directory")
    source = open_batch_source(cfg.data, trainer.batch_size, cfg.seed)
    widest = configs[int(np.argmax([getattr(c.sae, "k", 0) for c in configs]))]
    sae = sae_for(widest.sae, source)
    start = initial_parameters(cfg, sae, source)
    n_steps, params, input_scale, tx, schedule = (
        start.n_steps,
        start.params,
        start.input_scale,
        start.tx,
        start.schedule,
    )
    states = []
    for one in configs:
        state = init_state(sae, params, tx, input_scale)
        if cfg.sweep.key == "sae.k":
            state = state._replace(buffers={**state.buffers, "k": jnp.asarray(one.sae.k, jnp.int32)})
        states.append(state)
    coefficients = [sae_for(one.sae, source).sparsity_coefficient for one in configs]
    pure = pure_train_step(
        sae, tx, schedule, n_steps, cfg.optim.sparsity_warmup_fraction, trainer.dead_tokens, trainer.compute_dtype
    )
    mesh = Mesh(devices, ("instance",))
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *states)  # the instances' own buffers (donated)
    states = jax.device_put(stacked, NamedSharding(mesh, PartitionSpec("instance")))
    step = make_sweep_step(pure, coefficients, mesh)
    summaries = lambda states: (states.fire_counts, jax.vmap(sae.decoder_norms)(states.params))

    labels = [f"{cfg.sweep.key.split('.')[-1]}={value:g}" for value in cfg.sweep.values]
    checkpointer = Checkpointer(out_dir / CHECKPOINTS, cfg.checkpoint)
    with disk_errors(out_dir, kept=checkpointer.intact), checkpointer:  # as in train_single
        check_space(out_dir, run_space(checkpointer, states), "the run directory")
        states, done, saved, origin = resume(checkpointer, cfg.resume, out_dir, states, run_meta(cfg, sae.d_in, [])(0))
        print(
            f"training a sweep of {len(configs)} {cfg.sae.name} SAEs ({', '.join(labels)}) in one pass: "
            f"d_in={sae.d_in} d_sae={sae.d_sae} steps={n_steps} batch={trainer.batch_size} -> {out_dir}",
            flush=True,
        )
        run_ids = (saved or {}).get("wandb_run_ids") or [None] * len(labels)
        instances = []
        for one, label, run_id in zip(configs, labels, run_ids):
            (out_dir / label).mkdir(parents=True, exist_ok=True)
            tracker = tracking.make_tracker(
                cfg.logger, out_dir / label, config_lib.to_dict(one), run_id=run_id, name=f"{out_dir.name}/{label}"
            )
            log = ProgressLog(
                out_dir / label / "metrics.jsonl",
                n_steps,
                trainer.batch_size,
                resume_step=done,
                history=origin / label / "metrics.jsonl",
            )
            instances.append(Instance(sae_for(one.sae, source), one, out_dir / label, log, tracker))
        trackers = [one.tracker for one in instances]
        hooks = RunHooks(instances, source, stacked=True)
        try:
            states = run_steps(
                states,
                step,
                source.train_batches(trainer.batch_size, n_steps, cfg.seed, done),
                first_step=done,
                n_steps=n_steps,
                checkpointer=checkpointer,
                meta=run_meta(cfg, sae.d_in, trackers),
                hooks=hooks,
                summaries=summaries,
                **loop_settings(cfg),
            )
            checkpointer.wait()
            results = {
                one.out_dir.name: finish(
                    one.sae, one.cfg, state, export_buffers(state.buffers), source, one.out_dir, one.tracker
                )
                for one, state in zip(instances, hooks.split(jax.device_get(states)))
            }
        finally:
            hooks.close()
        write_atomic(out_dir / "sweep.json", json.dumps(results, indent=2).encode())
    return results
