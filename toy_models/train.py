"""Training many toy-model instances at once: vmapped instances, `lax.scan` over steps.

Matches Anthropic's toy-models notebook by default: AdamW (lr 1e-3, β = (0.9, 0.999), ε = 1e-8,
weight decay 0.01 on every parameter, i.e. PyTorch's defaults), batch 1024, 10,000 steps, loss =
importance-weighted squared error averaged over batch and features, summed over instances. Each
compiled call runs `steps_per_call` optimiser steps, so a run is a handful of Python calls.

Instances are independent, so the instance axis is sharded over all devices (padded to a multiple of
their number); on a CPU, `use_all_cpu_cores` makes each core a device, about 2× faster on 2 cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from toy_models import data, models

SCHEDULES = ("constant", "linear", "cosine")
EVAL_SEED_OFFSET = 0x5EED  # held-out batches come from a different stream than the training ones


@dataclass(frozen=True)
class Task:
    """What a batch looks like and which model sees it (static under jit)."""

    kind: str
    n_features: int
    n_hidden: int
    batch_size: int
    correlated_pairs: int = 0
    anticorrelated_pairs: int = 0
    rng: str = "hash"

    def batch(self, seed: jax.Array, step: jax.Array, feature_probability: jax.Array) -> jax.Array:
        """x: [I, n, batch] for one step."""
        shape = (feature_probability.shape[0], self.n_features, self.batch_size)
        u = data.uniform(self.rng, seed, step, shape)
        return data.sparse_features(
            u, feature_probability, self.kind == "abs", self.correlated_pairs, self.anticorrelated_pairs
        )


def learning_rate(lr: float, schedule: str, steps: int) -> optax.Schedule:
    """The notebook's schedules: constant, linear decay to 0, cosine decay to 0."""
    if schedule == "constant":
        return optax.constant_schedule(lr)
    if schedule == "linear":
        return optax.linear_schedule(lr, 0.0, steps)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    raise ValueError(f"train.schedule={schedule!r} is not one of {SCHEDULES}")


def make_optimizer(lr: float, schedule: str, steps: int, weight_decay: float) -> optax.GradientTransformation:
    """torch.optim.AdamW with its defaults (decoupled decay applied to W and b alike)."""
    return optax.adamw(learning_rate(lr, schedule, steps), b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


def make_chunk(task: Task, optimizer: optax.GradientTransformation, n_steps: int) -> Callable:
    """A jitted call running `n_steps` optimiser steps; returns (params, opt_state, mean loss [I])."""

    def total_loss(params, x, importance):
        per_instance = models.loss_per_instance(params, x, importance, task.kind)
        return per_instance.sum(), per_instance

    def step(carry, step_index, seed, feature_probability, importance):
        params, opt_state = carry
        x = task.batch(seed, step_index, feature_probability)
        grads, per_instance = jax.grad(total_loss, has_aux=True)(params, x, importance)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), per_instance

    @jax.jit
    def chunk(params, opt_state, seed, start, feature_probability, importance):
        steps = start + jnp.arange(n_steps, dtype=jnp.uint32)
        body = lambda carry, i: step(carry, i, seed, feature_probability, importance)
        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), steps)
        return params, opt_state, losses.mean(axis=0)

    return chunk


@dataclass
class TrainResult:
    params: dict[str, np.ndarray]  # per instance, see models.init_params
    eval_loss: np.ndarray  # [I] on held-out batches
    loss_curve: np.ndarray  # [n_calls, I] mean training loss over each compiled call
    curve_steps: np.ndarray  # [n_calls] step at the end of each call
    seconds: float  # wall time of the optimisation (compiles included)


def train(
    task: Task,
    feature_probability: np.ndarray,
    importance: np.ndarray,
    seed: int,
    steps: int = 10_000,
    lr: float = 1e-3,
    schedule: str = "constant",
    weight_decay: float = 0.01,
    steps_per_call: int = 1000,
    eval_batches: int = 8,
    on_progress: Callable[[int, np.ndarray], None] | None = None,
    init: models.Params | None = None,
) -> TrainResult:
    """Train len(feature_probability) instances; feature_probability: [I], importance: [I, n].

    init: the starting parameters (leading axis [I]); by default models.init_params(key(seed)).
    """
    n_instances = len(feature_probability)
    shard, padded = instance_sharding(n_instances)
    fp = shard(jnp.asarray(_pad(np.asarray(feature_probability), padded), jnp.float32))
    imp = shard(jnp.asarray(_pad(np.asarray(importance), padded), jnp.float32))
    if init is None:
        params = models.init_params(jax.random.key(seed), task.kind, padded, task.n_features, task.n_hidden)
    else:
        params = {name: jnp.asarray(_pad(np.asarray(value), padded)) for name, value in init.items()}
    optimizer = make_optimizer(lr, schedule, steps, weight_decay)
    params = jax.tree.map(shard, params)
    opt_state = jax.tree.map(shard, optimizer.init(params))
    seed_arr = jnp.uint32(seed)
    chunks = {}
    curve, curve_steps = [], []
    start_time = time.perf_counter()
    done = 0
    while done < steps:
        n = min(steps_per_call, steps - done)
        if n not in chunks:
            chunks[n] = make_chunk(task, optimizer, n)
        params, opt_state, loss = chunks[n](params, opt_state, seed_arr, jnp.uint32(done), fp, imp)
        done += n
        curve.append(loss)
        curve_steps.append(done)
        if on_progress is not None:
            on_progress(done, np.asarray(loss)[:n_instances])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start_time
    eval_loss = evaluate(task, params, fp, imp, seed, eval_batches)
    return TrainResult(
        params=jax.tree.map(lambda v: np.asarray(v)[:n_instances], params),
        eval_loss=eval_loss[:n_instances],
        loss_curve=np.asarray(jnp.stack(curve))[:, :n_instances],
        curve_steps=np.asarray(curve_steps),
        seconds=seconds,
    )


def instance_sharding(n_instances: int) -> tuple[Callable, int]:
    """A function placing arrays with a leading instance axis across all devices, and the padded count."""
    devices = jax.devices()
    padded = -(-n_instances // len(devices)) * len(devices)
    mesh = jax.make_mesh((len(devices),), ("instances",), axis_types=(jax.sharding.AxisType.Auto,))
    by_instance, replicated = NamedSharding(mesh, PartitionSpec("instances")), NamedSharding(mesh, PartitionSpec())

    def shard(value):
        placed = by_instance if value.ndim and value.shape[0] == padded else replicated
        return jax.device_put(value, placed)

    return shard, padded


def _pad(values: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last instance's row up to n rows (the extra instances are trained, then dropped)."""
    return np.concatenate([values, np.repeat(values[-1:], n - len(values), axis=0)])


def use_all_cpu_cores() -> None:
    """Expose each CPU core as a JAX device (call before JAX initialises its backends).

    XLA runs one CPU computation on one thread for ops this small; as separate devices the cores
    each train a share of the instances.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def evaluate(task: Task, params, feature_probability, importance, seed: int, n_batches: int) -> np.ndarray:
    """Mean loss per instance over `n_batches` held-out batches: [I]."""

    @jax.jit
    def loss_at(params, step):
        x = task.batch(jnp.uint32(seed + EVAL_SEED_OFFSET), step, feature_probability)
        return models.loss_per_instance(params, x, importance, task.kind)

    return np.mean([np.asarray(loss_at(params, jnp.uint32(i))) for i in range(n_batches)], axis=0)
