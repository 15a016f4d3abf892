"""Geometric median (Weiszfeld's algorithm), used to initialise b_dec (Bricken et al. 2023)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def geometric_median(points: jax.Array, n_iter: int = 100, eps: float = 1e-8) -> jax.Array:
    """argmin_y Σ_i ‖points_i − y‖ for points: [n, d] -> [d], by iteratively reweighted means."""

    def step(_, y):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - y, axis=-1), eps)
        return weights @ points / jnp.sum(weights)

    return jax.lax.fori_loop(0, n_iter, step, jnp.mean(points, axis=0))
