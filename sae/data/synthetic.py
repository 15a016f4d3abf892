"""Synthetic activations with known ground-truth features, generated on the device from the seed.

x = Σ_i c_i d_i + noise, with d_i ∈ ℝ^{d_in} (i < n_features) random unit directions and sparse
non-negative coefficients: feature i fires with probability p_i ∝ (i + 1)^(−decay), scaled so that
Σ_i p_i = mean_active, and then has magnitude |N(magnitude_mean, magnitude_std)|. Optional groups of
features fire together: within a group a member reuses the group's uniform draw with probability
`group_correlation` (a shared threshold variable, so marginal probabilities are unchanged).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sae.config import SyntheticConfig


def firing_probabilities(n_features: int, mean_active: float, decay: float) -> np.ndarray:
    """[n_features] p_i ∝ (i + 1)^(−decay), capped at 1, summing to mean_active."""
    weights = (np.arange(n_features) + 1.0) ** -decay
    p = np.minimum(weights * mean_active / weights.sum(), 1.0)
    for _ in range(100):  # redistribute the mass lost to the cap
        deficit = mean_active - p.sum()
        free = p < 1
        if deficit < 1e-9 or not free.any():
            break
        p[free] = np.minimum(p[free] + deficit * weights[free] / weights[free].sum(), 1.0)
    return p.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticFeatures:
    """The ground truth of a synthetic run. directions: [n_features, d_in]; probabilities: [n_features];
    group: [n_features] int, the correlated group of each feature (−1: none)."""

    cfg: SyntheticConfig
    directions: jax.Array
    probabilities: jax.Array
    group: jax.Array

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @classmethod
    def create(cls, cfg: SyntheticConfig, key: jax.Array) -> "SyntheticFeatures":
        directions = jax.random.normal(key, (cfg.n_features, cfg.d_in))
        directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
        p = firing_probabilities(cfg.n_features, cfg.mean_active, cfg.probability_decay)
        n_grouped = cfg.n_correlated_groups * cfg.group_size
        group = np.full(cfg.n_features, -1, np.int32)
        group[:n_grouped] = np.arange(n_grouped) // cfg.group_size
        # Spread grouped features over the probability ranks rather than taking the most frequent.
        group = np.random.default_rng(0).permutation(group)
        return cls(cfg, directions, jnp.asarray(p), jnp.asarray(group))

    def sample_coefficients(self, key: jax.Array, batch_size: int) -> jax.Array:
        """[batch_size, n_features] sparse non-negative coefficients c (jit-able; batch_size static)."""
        cfg = self.cfg
        k_own, k_group, k_share, k_mag = jax.random.split(key, 4)
        u = jax.random.uniform(k_own, (batch_size, cfg.n_features))
        if cfg.n_correlated_groups:
            u_group = jax.random.uniform(k_group, (batch_size, cfg.n_correlated_groups))
            share = (self.group >= 0) & jax.random.bernoulli(k_share, cfg.group_correlation, u.shape)
            u = jnp.where(share, u_group[:, jnp.maximum(self.group, 0)], u)
        magnitude = jnp.abs(cfg.magnitude_mean + cfg.magnitude_std * jax.random.normal(k_mag, u.shape))
        return jnp.where(u < self.probabilities, magnitude, 0.0)

    def sample(self, key: jax.Array, batch_size: int) -> jax.Array:
        """[batch_size, d_in] activations x = c · directions + noise (jit-able; batch_size static)."""
        k_coef, k_noise = jax.random.split(key)
        x = self.sample_coefficients(k_coef, batch_size) @ self.directions
        if self.cfg.noise_std:
            x = x + self.cfg.noise_std * jax.random.normal(k_noise, x.shape)
        return x
