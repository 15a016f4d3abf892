"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435; Gemma Scope).

  z = x W_enc + b_enc
  f = JumpReLU_θ(z) = z · H(z − θ),  θ > 0 learned per latent            (eq. 4)
  loss = ‖x − x̂‖² + λ Σ_i H(z_i − θ_i)                                   (eq. 7, the L0 penalty)

H has zero gradient almost everywhere, so θ learns from straight-through pseudo-gradients with a
rectangle kernel K(u) = 1{|u| < ½} and bandwidth ε (eqs. 11–12):

  ∂JumpReLU/∂θ = −(θ/ε) K((z − θ)/ε),   ∂H/∂θ = −(1/ε) K((z − θ)/ε),   ∂H/∂z = 0.

θ is stored directly (not as log θ: a log-parameterised threshold barely moves under Adam, SAELens
PR #718) and clipped at 0 after each update. Decoder rows unit norm, W_enc = W_decᵀ at init.

The step is sparse once the code is (capacity.py): a latent takes a slot of its row when z > θ − ε/2, active
or within the kernel's window below θ (where only θ's pseudo-gradient reaches it), and the loss, the L0
penalty and every gradient are computed on the slots alone; a row with more slots than every capacity
makes the step dense. Every path is exact.
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
    decode_sparse,
    register,
    selected_preacts,
    squared_error,
    tied_init,
)
from sae.architectures.capacity import CapacityRoute
from sae.architectures.sparse import fire_counts_from_indices, matmul_from
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
    """z · H(z − θ). z: [batch, d_sae]; θ: [d_sae] (or θ per entry, z's shape: a sparse code's slots)."""
    return z * (z > theta)


def _jumprelu_fwd(z, theta, bandwidth):
    return jumprelu(z, theta, bandwidth), (z, theta)


def _per_latent(dtheta: jax.Array, theta: jax.Array) -> jax.Array:
    """θ's gradient: summed over the batch for θ [d_sae], as is for a θ per entry (gathered for slots)."""
    return jnp.sum(dtheta, axis=0) if theta.ndim < dtheta.ndim else dtheta


def _jumprelu_bwd(bandwidth, res, g):
    z, theta = res
    dz = g * (z > theta)
    return dz, _per_latent(g * -(theta / bandwidth) * rectangle((z - theta) / bandwidth), theta)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """H(z − θ) with the pseudo-gradient ∂/∂θ = −(1/ε) K((z − θ)/ε) and no gradient to z."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, bandwidth):
    return step(z, theta, bandwidth), (z, theta)


def _step_bwd(bandwidth, res, g):
    z, theta = res
    return jnp.zeros_like(z), _per_latent(g * -(1.0 / bandwidth) * rectangle((z - theta) / bandwidth), theta)


step.defvjp(_step_fwd, _step_bwd)


@register
@dataclasses.dataclass(frozen=True)
class JumpReLU(CapacityRoute, UnitNormDecoder):
    name = "jumprelu"
    config = JumpReLUConfig
    saelens = "jumprelu"  # ReLU(z) · 1[z > θ] equals z · H(z − θ) for θ ≥ 0, which post_update keeps
    pre_bias = False
    sparsity = "l0_coefficient"
    sweep = ("l0_coefficient",)

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        params = tied_init(key, self.d_sae, self.d_in, b_dec)
        return {**params, "threshold": jnp.full((self.d_sae,), self.cfg.threshold_init)}

    def slot_bias(self, params):
        """z − (θ − ε/2 − ε/128) > 0: active, or within the pseudo-gradient's window below θ. The window's test
        |z − θ| / ε < ½ rounds otherwise than this sum, so the slots reach ε/128 past the window's edge: an
        entry there may take a slot and contributes nothing, none inside is left out."""
        return params["b_enc"] - params["threshold"] + (0.5 + 1 / 128) * self.cfg.bandwidth

    def dense_forward(self, params, buffers, x, y, coefficient, xw) -> Forward:
        z = matmul_from(xw, x, params["W_enc"]) + params["b_enc"]  # the route's x W_enc, a matmul's gradient
        f = jumprelu(z, params["threshold"], self.cfg.bandwidth)
        l0 = jnp.mean(jnp.sum(step(z, params["threshold"], self.cfg.bandwidth), axis=-1))
        active = f != 0
        counts = jnp.sum(active, axis=0, dtype=jnp.int32)
        return self._loss(y, self.decode(params, f), l0, coefficient, buffers, counts, jnp.sum(active))

    def sparse_forward(self, params, buffers, x, y, coefficient, xw, idx) -> Forward:
        slot = idx >= 0  # idx: [batch, C] the slots' latents, −1 empty
        z = selected_preacts(params, x, xw, idx, pre_bias=False)
        theta = params["threshold"][idx]
        f = jnp.where(slot, jumprelu(z, theta, self.cfg.bandwidth), 0.0)
        l0 = jnp.mean(jnp.sum(jnp.where(slot, step(z, theta, self.cfg.bandwidth), 0.0), axis=-1))
        counts = fire_counts_from_indices(f, idx, self.d_sae)
        return self._loss(y, decode_sparse(params, f, idx), l0, coefficient, buffers, counts, jnp.sum(f != 0))

    def _loss(self, y, x_hat, l0, coefficient, buffers, fire_counts, n_active) -> Forward:
        mse = squared_error(y, x_hat)
        return Forward(
            loss=mse + coefficient * l0,
            x_hat=x_hat,
            fire_counts=fire_counts,
            l0=n_active / y.shape[0],
            terms={"mse_loss": mse, "l0_loss": l0},
            buffers=buffers,
        )

    def post_update(self, params: Params) -> Params:
        params = super().post_update(params)
        return {**params, "threshold": jnp.maximum(params["threshold"], 0.0)}
