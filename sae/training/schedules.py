"""Learning-rate and sparsity-coefficient schedules (functions of the step, usable inside jit)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def lr_schedule(lr: float, n_steps: int, warmup_fraction: float, decay_fraction: float) -> optax.Schedule:
    """Linear warm-up from 0 over the first `warmup_fraction` of steps, constant, then linear decay
    to 0 over the last `decay_fraction` (Anthropic April 2024 update; SAELens's lr_decay_steps)."""
    warmup = round(warmup_fraction * n_steps)
    decay = round(decay_fraction * n_steps)
    decay_start = n_steps - decay

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        up = jnp.where(warmup > 0, jnp.minimum((step + 1) / max(warmup, 1), 1.0), 1.0)
        down = jnp.where(decay > 0, jnp.clip((n_steps - step) / max(decay, 1), 0.0, 1.0), 1.0)
        return lr * jnp.minimum(up, jnp.where(step >= decay_start, down, 1.0))

    return schedule


def sparsity_warmup(n_steps: int, warmup_fraction: float) -> optax.Schedule:
    """Multiplier of the sparsity coefficient λ: linear from 0 to 1 over the first fraction of steps."""
    warmup = round(warmup_fraction * n_steps)

    def schedule(step):
        if warmup == 0:
            return jnp.ones(())
        return jnp.minimum((jnp.asarray(step, jnp.float32) + 1) / warmup, 1.0)

    return schedule
