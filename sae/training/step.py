"""The train step: one jitted, state-donating call (loss → grads → optax update → constraint)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sae.architectures import SAE, Params
from sae.architectures.base import pair
from sae.architectures.sparse import latent_sharded_top_k, per_device_code
from sae.config import OptimConfig
from sae.training.schedules import lr_schedule, sparsity_warmup

# Saturate the dead-latent counters here so int32 never overflows on long runs.
_COUNTER_CAP = 2**30


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree).

    tokens_since_fired: [n_latents] int32, tokens since each latent last fired (dead ≥ trainer.dead_tokens);
    fire_counts: [n_latents] uint32, tokens each latent has fired on, wrapping modulo 2³², so the density
        over a window of fewer than 2³² tokens is the wrapped difference of two snapshots;
    input_scale: scalar, the factor x is multiplied by before the SAE (1 without normalisation).
    """

    params: Params
    opt_state: optax.OptState
    buffers: dict[str, jax.Array]
    tokens_since_fired: jax.Array
    fire_counts: jax.Array
    step: jax.Array
    input_scale: jax.Array


def make_optimizer(cfg: OptimConfig, lr: float, n_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam with the lr schedule, after global-norm clipping when cfg.grad_clip is set."""
    schedule = lr_schedule(lr, n_steps, cfg.warmup_fraction, cfg.decay_fraction)
    adam = optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    if cfg.grad_clip is None:
        return adam, schedule
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam), schedule


def init_state(sae: SAE, params: Params, tx: optax.GradientTransformation, input_scale: float) -> TrainState:
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        buffers=sae.init_buffers(),
        tokens_since_fired=jnp.zeros((sae.n_latents,), jnp.int32),
        fire_counts=jnp.zeros((sae.n_latents,), jnp.uint32),
        step=jnp.zeros((), jnp.int32),
        input_scale=jnp.asarray(input_scale, jnp.float32),
    )


def fraction_of_variance_unexplained(y: jax.Array, y_hat: jax.Array) -> jax.Array:
    """FVU = Σ‖y − ŷ‖² / Σ‖y − mean(y)‖², the mean taken over the batch (y: [batch, ...])."""
    return jnp.sum(jnp.square(y - y_hat)) / jnp.sum(jnp.square(y - jnp.mean(y, axis=0)))


def pure_train_step(
    sae: SAE,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    n_steps: int,
    sparsity_warmup_fraction: float,
    dead_tokens: int,
    compute_dtype: str = "float32",
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The uncompiled step (state, batch, λ) -> (state, metrics); λ is the sparsity coefficient before warm-up.

    batch: x [batch, d_in] for an SAE, whose target is x itself (after the input scale), or (x, y) for a
    transcoder, y [batch, d_out] the raw target (a CLT: [batch, n_layers, d]). A skip transcoder's family
    sees the target y − x W_skip, so the skip path is trained here once for every family. The forward and
    backward passes run in `compute_dtype` (activations of any dtype are cast on the device); gradients
    come back in the parameters' dtype for the optimiser.
    """
    warmup = sparsity_warmup(n_steps, sparsity_warmup_fraction)
    compute, f32 = jnp.dtype(compute_dtype), jnp.float32

    def cast(params: Params) -> Params:
        return jax.tree.map(lambda v: v.astype(compute) if jnp.issubdtype(v.dtype, jnp.floating) else v, params)

    def train_step(state: TrainState, batch, base_coefficient: jax.Array):
        x, y = pair(batch)
        x = x.astype(jnp.float32)
        if sae.cfg.normalize_activations:  # else input_scale is 1: skip a pass over the batch
            x = x * state.input_scale
        y = x if y is None else y.astype(jnp.float32)
        coefficient = base_coefficient * warmup(state.step)
        dead = state.tokens_since_fired >= dead_tokens

        def loss_fn(params, route=None):
            p, xc = cast(params), x.astype(compute)
            skip = sae.skip(p, xc)
            target = xc if y is x else (y.astype(compute) - skip if sae.cfg.skip else y.astype(compute))
            path = {} if route is None else {"route": route}
            out = sae.forward(p, state.buffers, xc, target, dead, coefficient, **path)
            return out.loss.astype(jnp.float32), (out, skip)

        route = sae.route(cast(state.params), state.buffers, x.astype(compute))
        path_metrics = {}
        if route is None:
            (loss, (out, skip)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        else:  # e.g. a sparse path where it is exact, else a dense one: only the chosen one runs
            choice, plan = route

            def path(i: int):
                return lambda params: jax.value_and_grad(partial(loss_fn, route=(i, plan)), has_aux=True)(params)

            (loss, (out, skip)), grads = jax.lax.switch(choice, [path(i) for i in range(sae.paths)], state.params)
            path_metrics = {"step_path": choice.astype(f32)}
        grads = sae.project_grads(state.params, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = sae.post_update(optax.apply_updates(state.params, updates))
        since = jnp.where(out.fire_counts > 0, 0, jnp.minimum(state.tokens_since_fired + x.shape[0], _COUNTER_CAP))
        counts = state.fire_counts + out.fire_counts.astype(jnp.uint32)
        new_state = TrainState(params, opt_state, out.buffers, since, counts, state.step + 1, state.input_scale)
        metrics = {
            "loss": loss,
            **out.terms,
            "l0": out.l0,
            "fvu": fraction_of_variance_unexplained(y, (out.x_hat + skip if sae.cfg.skip else out.x_hat).astype(f32)),
            "dead_fraction": jnp.mean(since >= dead_tokens),
            "lr": schedule(state.step),
            "sparsity_coefficient": coefficient,
            **path_metrics,
        }
        return new_state, metrics

    return train_step


def make_train_step(
    sae: SAE,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    n_steps: int,
    sparsity_warmup_fraction: float,
    dead_tokens: int,
    shardings: tuple | None = None,
    compute_dtype: str = "float32",
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """(state, batch) -> (state, metrics), compiled once, with the state donated; batch: x [batch, d_in] or
    a transcoder's (x, y) (see `pure_train_step`).

    shardings: (state shardings, batch sharding, replicated) from sae/parallel.py, or None for one device.
    """
    step = pure_train_step(sae, tx, schedule, n_steps, sparsity_warmup_fraction, dead_tokens, compute_dtype)

    def train_step(state: TrainState, batch):
        return step(state, batch, sae.sparsity_coefficient)

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0)

    state_sharding, batch_sharding, replicated = shardings
    model_shards = batch_sharding.mesh.shape.get("model", 1)

    def sharded_step(state: TrainState, batch):
        with latent_sharded_top_k(model_shards):
            return train_step(state, batch)

    return jax.jit(
        sharded_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )


def make_sweep_step(
    step: Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]],
    coefficients: list[float],
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Several SAEs on the same batch in one compiled call: (states, x) -> (states, metrics).

    step: a `pure_train_step`; states: the instances' TrainStates stacked on a leading axis [I, ...],
    split over the devices of the one-axis mesh ("instance"); coefficients: their λ; x: [batch, d_in],
    the same on every device. Each device runs its instances one after another (`lax.scan`), with no
    communication. A scan rather than `jax.vmap` keeps the TopK family's sparse ops unbatched (under
    vmap they became generic batched gathers and scatters, 2.8× slower), and rather than the instances
    side by side in one program it holds one instance's temporaries at a time: side by side, a 4-SAE
    sweep's buffers outgrew what the allocator keeps and every step paged in ~50 MB afresh.
    Metrics come back stacked on the instance axis.
    """
    spec = jax.sharding.PartitionSpec("instance")
    coefficients = jax.device_put(jnp.asarray(coefficients, jnp.float32), jax.sharding.NamedSharding(mesh, spec))

    def local(states: TrainState, x: jax.Array, local_coefficients: jax.Array):
        def one(_, instance):
            state, coefficient = instance
            return None, step(state, x, coefficient)

        with per_device_code():
            _, (states, metrics) = jax.lax.scan(one, None, (states, local_coefficients))
        return states, metrics

    # check_vma off: no collectives here, and the step's loops (top-k) carry values the checker cannot type
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec(), spec), out_specs=(spec, spec), check_vma=False
    )
    compiled = jax.jit(sharded, donate_argnums=0)
    return lambda states, x: compiled(states, x, coefficients)
