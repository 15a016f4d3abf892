"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435; Gemma Scope).

  z = x W_enc + b_enc
  f = JumpReLU_θ(z) = z · H(z − θ),  θ > 0 learned per latent            (eq. 4)
  loss = ‖x − x̂‖² + λ Σ_i H(z_i − θ_i)                                   (eq. 7, the L0 penalty)

H has zero gradient almost everywhere, so θ learns from straight-through pseudo-gradients with a
rectangle kernel K(u) = 1{|u| < ½} and bandwidth ε (eqs. 11–12):

  ∂JumpReLU/∂θ = −(θ/ε) K((z − θ)/ε),   ∂H/∂θ = −(1/ε) K((z − θ)/ε),   ∂H/∂z = 0.

θ is stored directly (not as log θ: a log-parameterised threshold barely moves under Adam, SAELens
PR #718) and clipped at 0 after each update. Decoder rows unit norm, W_enc = W_decᵀ at init.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from sae.architectures.base import (
    Forward,
    Params,
    SAEConfig,
    UnitNormDecoder,
    preacts,
    register,
    squared_error,
    tied_init,
)
from sae.errors import positive, require


@dataclasses.dataclass
class JumpReLUConfig(SAEConfig):
    name: str = "jumprelu"
    l0_coefficient: float = 0.3
    threshold_init: float = 0.1
    bandwidth: float = 0.05  # ε of the rectangle kernel

    def check(self) -> None:
        super().check()
        require(self.l0_coefficient >= 0, f"sae.l0_coefficient={self.l0_coefficient} must be ≥ 0")
        positive(self.bandwidth, "sae.bandwidth")
        positive(self.threshold_init, "sae.threshold_init")


def rectangle(u: jax.Array) -> jax.Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """z · H(z − θ). z: [batch, d_sae]; θ: [d_sae]."""
    return z * (z > theta)


def _jumprelu_fwd(z, theta, bandwidth):
    return jumprelu(z, theta, bandwidth), (z, theta)


def _jumprelu_bwd(bandwidth, res, g):
    z, theta = res
    dz = g * (z > theta)
    dtheta = jnp.sum(g * -(theta / bandwidth) * rectangle((z - theta) / bandwidth), axis=0)
    return dz, dtheta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """H(z − θ) with the pseudo-gradient ∂/∂θ = −(1/ε) K((z − θ)/ε) and no gradient to z."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, bandwidth):
    return step(z, theta, bandwidth), (z, theta)


def _step_bwd(bandwidth, res, g):
    z, theta = res
    dtheta = jnp.sum(g * -(1.0 / bandwidth) * rectangle((z - theta) / bandwidth), axis=0)
    return jnp.zeros_like(z), dtheta


step.defvjp(_step_fwd, _step_bwd)


@register
@dataclasses.dataclass(frozen=True)
class JumpReLU(UnitNormDecoder):
    name = "jumprelu"
    config = JumpReLUConfig
    saelens = "jumprelu"  # ReLU(z) · 1[z > θ] equals z · H(z − θ) for θ ≥ 0, which post_update keeps
    pre_bias = False
    sparsity = "l0_coefficient"
    sweep = ("l0_coefficient",)

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        params = tied_init(key, self.d_sae, self.d_in, b_dec)
        return {**params, "threshold": jnp.full((self.d_sae,), self.cfg.threshold_init)}

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient) -> Forward:
        z = preacts(params, x, pre_bias=False)
        f = jumprelu(z, params["threshold"], self.cfg.bandwidth)
        x_hat = self.decode(params, f)
        mse = squared_error(y, x_hat)
        l0 = jnp.mean(jnp.sum(step(z, params["threshold"], self.cfg.bandwidth), axis=-1))
        active = f != 0
        return Forward(
            loss=mse + sparsity_coefficient * l0,
            x_hat=x_hat,
            fire_counts=jnp.sum(active, axis=0, dtype=jnp.int32),
            l0=jnp.mean(jnp.sum(active, axis=-1)),
            terms={"mse_loss": mse, "l0_loss": l0},
            buffers=buffers,
        )

    def post_update(self, params: Params) -> Params:
        params = super().post_update(params)
        return {**params, "threshold": jnp.maximum(params["threshold"], 0.0)}
