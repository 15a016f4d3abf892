"""A sweep trained in one pass: `sae-train sweep.key=sae.k sweep.values=[16,32,64]`.

The instances share everything but the swept value: the batches (read and moved once), the geometric-
median b_dec and the initialisation seed. One compiled step trains them all side by side
(dictionary_learning's pattern; see `make_sweep_step` for why not `jax.vmap`). A sweep over k builds the TopK SAE
with the largest k and keeps each instance's own k largest (`topk.keep_first_k`, k held in its buffers);
coefficient sweeps pass each instance's λ. Each instance ends as a run directory of its own under
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

from sae import config as config_lib
from sae import parallel
from sae.architectures import make_sae
from sae.data import make_source
from sae.training.loop import ProgressLog, finish, initial_parameters
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
    """Train every instance of the sweep; returns {label: final metrics} (also out_dir/sweep.json)."""
    config_lib.check(cfg)
    if parallel.make_mesh(cfg.mesh).size > 1 or jax.process_count() > 1:
        raise config_lib.ConfigError("sweeps run on one device for now: set mesh.data=1 mesh.model=1")
    configs = instance_configs(cfg)
    for one in configs:
        config_lib.check(one)
    trainer, out_dir = cfg.trainer, Path(out_dir).absolute()
    source = make_source(cfg.data, trainer.batch_size, cfg.seed)
    widest = configs[int(np.argmax([getattr(c.sae, "k", 0) for c in configs]))]
    sae = make_sae(widest.sae, source.d_in)
    start = initial_parameters(cfg, sae, source)
    n_steps, params, input_scale, tx, schedule = start.n_steps, start.params, start.input_scale, start.tx, start.schedule
    states = []
    for one in configs:
        state = init_state(sae, jax.tree.map(jnp.copy, params), tx, input_scale)  # own buffers (donated)
        if cfg.sweep.key == "sae.k":
            state = state._replace(buffers={**state.buffers, "k": jnp.asarray(one.sae.k, jnp.int32)})
        states.append(state)
    states = tuple(states)
    coefficients = [make_sae(one.sae, source.d_in).sparsity_coefficient for one in configs]
    step = make_sweep_step(pure_train_step(sae, tx, schedule, n_steps, cfg.optim.sparsity_warmup_fraction,
                                           trainer.dead_tokens, trainer.compute_dtype), coefficients)

    labels = [f"{cfg.sweep.key.split('.')[-1]}={value:g}" for value in cfg.sweep.values]
    print(f"training a sweep of {len(configs)} {cfg.sae.name} SAEs ({', '.join(labels)}) in one pass: "
          f"d_in={sae.d_in} d_sae={sae.d_sae} steps={n_steps} batch={trainer.batch_size} -> {out_dir}", flush=True)
    logs = []
    for label in labels:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        logs.append(ProgressLog(out_dir / label / "metrics.jsonl", n_steps, trainer.batch_size))
    pending = None
    for step_index, x in enumerate(source.train_batches(trainer.batch_size, n_steps, cfg.seed), start=1):
        states, metrics = step(states, x)
        if pending is not None:
            _write(logs, *pending)
        pending = None
        if step_index % trainer.log_every == 0 or step_index == n_steps:
            pending = (step_index, metrics)
    if pending is not None:
        _write(logs, *pending)

    results = {}
    for one, label, log, state in zip(configs, labels, logs, jax.device_get(states)):
        log.close()
        buffers = {name: value for name, value in state.buffers.items() if name != "k"}
        results[label] = finish(make_sae(one.sae, source.d_in), one, state, buffers, source, out_dir / label)
    (out_dir / "sweep.json").write_text(json.dumps(results, indent=2))
    return results


def _write(logs: list[ProgressLog], step: int, metrics: dict) -> None:
    metrics = jax.device_get(metrics)
    for i, log in enumerate(logs):
        log.write(step, {name: value[i] for name, value in metrics.items()})
