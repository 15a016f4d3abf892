"""Adam (Kingma & Ba 2014, Algorithm 1) after optional global-norm clipping (Pascanu et al. 2012), exactly as
optax.chain(optax.clip_by_global_norm(c), optax.adam(schedule, b1, b2, eps)), applied in one pass.

  ĝ = g · min(1, c / ‖g‖)                      (‖g‖ the global norm over every parameter)
  m ← b₁ m + (1 − b₁) ĝ,   v ← b₂ v + (1 − b₂) ĝ²
  p ← p − η_t (m / (1 − b₁ᵗ)) / (√(v / (1 − b₂ᵗ)) + ε)

optax computes the updates as a tree and adds them to the parameters afterwards; XLA's CPU compiler then
materialises that tree and recomputes the moments for each output, about 3× the memory traffic of one pass
over (p, g, m, v) writing (p, m, v). `Optimizer.apply` is that one pass per parameter. Its state is optax's own
(`init`), so checkpoints, shardings and `update` (optax's, the reference in tests) are unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sae.config import OptimConfig
from sae.training.schedules import lr_schedule


class Optimizer(NamedTuple):
    """optax's transformation `tx` (state layout, `init`, `update`) and the same step as one pass (`apply`)."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    b1: float
    b2: float
    eps: float
    clip: float | None

    def init(self, params) -> optax.OptState:
        return self.tx.init(params)

    def update(self, grads, state: optax.OptState, params=None):
        """optax's (updates, state): the reference `apply` equals."""
        return self.tx.update(grads, state, params)

    def apply(self, grads, state: optax.OptState, params):
        """(params after the step, state): optax.apply_updates(params, update(grads, state)[0]) in one pass."""
        adam, schedule = state if self.clip is None else state[1]
        count = optax.safe_increment(adam.count)
        corrections = [1 - decay**count for decay in (self.b1, self.b2)]
        if self.clip is None:
            scale = lambda g: g  # noqa: E731
        else:
            norm = optax.tree.norm(grads)
            scale = lambda g: jax.lax.select(norm < self.clip, g, (g / norm.astype(g.dtype)) * self.clip)  # noqa: E731
        rate = -self.schedule(schedule.count)

        def one(p, g, m, v):
            g = scale(g)
            m = (1 - self.b1) * g + self.b1 * m
            v = (1 - self.b2) * g**2 + self.b2 * v
            m_hat, v_hat = m / corrections[0].astype(m.dtype), v / corrections[1].astype(v.dtype)
            return p + jnp.array(rate, p.dtype) * (m_hat / (jnp.sqrt(v_hat) + self.eps)), m, v

        leaves, tree = jax.tree.flatten(params)
        stepped = [
            one(*args) for args in zip(leaves, *(tree.flatten_up_to(t) for t in (grads, adam.mu, adam.nu)), strict=True)
        ]
        new_params, mu, nu = (tree.unflatten(column) for column in zip(*stepped))
        adam = adam._replace(count=count, mu=mu, nu=nu)
        schedule = schedule._replace(count=optax.safe_increment(schedule.count))
        return new_params, ((adam, schedule) if self.clip is None else (state[0], (adam, schedule)))


def make_optimizer(cfg: OptimConfig, lr: float, n_steps: int) -> tuple[Optimizer, optax.Schedule]:
    """Adam with the lr schedule, after global-norm clipping when cfg.grad_clip is set."""
    schedule = lr_schedule(lr, n_steps, cfg.warmup_fraction, cfg.decay_fraction)
    tx = optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
    if cfg.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
    return Optimizer(tx, schedule, cfg.beta1, cfg.beta2, cfg.eps, cfg.grad_clip), schedule
