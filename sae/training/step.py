"""The train step: one jitted, state-donating call (loss → grads → optax update → constraint)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sae.architectures import SAE, Params
from sae.architectures.base import without_topk_barrier
from sae.config import OptimConfig
from sae.training.schedules import lr_schedule, sparsity_warmup

# Saturate the dead-latent counters here so int32 never overflows on long runs.
_COUNTER_CAP = 2**30


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree).

    tokens_since_fired: [d_sae] int32, tokens since each latent last fired (dead ≥ trainer.dead_tokens);
    input_scale: scalar, the factor x is multiplied by before the SAE (1 without normalisation).
    """

    params: Params
    opt_state: optax.OptState
    buffers: dict[str, jax.Array]
    tokens_since_fired: jax.Array
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
        tokens_since_fired=jnp.zeros((sae.d_sae,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        input_scale=jnp.asarray(input_scale, jnp.float32),
    )


def fraction_of_variance_unexplained(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖², the mean taken over the batch."""
    return jnp.sum(jnp.square(x - x_hat)) / jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))


def make_train_step(
    sae: SAE,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    n_steps: int,
    sparsity_warmup_fraction: float,
    dead_tokens: int,
    shardings: tuple | None = None,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """(state, x: [batch, d_in]) -> (state, metrics), compiled once, with the state donated.

    shardings: (state shardings, batch sharding, replicated) from sae/parallel.py, or None for one device.
    """
    warmup = sparsity_warmup(n_steps, sparsity_warmup_fraction)

    def train_step(state: TrainState, x: jax.Array):
        x = x.astype(jnp.float32) * state.input_scale
        coefficient = sae.sparsity_coefficient * warmup(state.step)
        dead = state.tokens_since_fired >= dead_tokens

        def loss_fn(params):
            out = sae.forward(params, state.buffers, x, dead, coefficient)
            return out.loss, out

        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = sae.project_grads(state.params, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = sae.post_update(optax.apply_updates(state.params, updates))
        since = jnp.where(out.fired, 0, jnp.minimum(state.tokens_since_fired + x.shape[0], _COUNTER_CAP))
        new_state = TrainState(params, opt_state, out.buffers, since, state.step + 1, state.input_scale)
        metrics = {
            "loss": loss,
            **out.terms,
            "l0": out.l0,
            "fvu": fraction_of_variance_unexplained(x, out.x_hat),
            "dead_fraction": jnp.mean(since >= dead_tokens),
            "lr": schedule(state.step),
            "sparsity_coefficient": coefficient,
        }
        return new_state, metrics

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0)

    def sharded_step(state: TrainState, x: jax.Array):
        with without_topk_barrier():
            return train_step(state, x)

    state_sharding, batch_sharding, replicated = shardings
    return jax.jit(sharded_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
