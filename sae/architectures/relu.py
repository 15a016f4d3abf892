"""ReLU SAE with L1 penalty and unit-norm decoder (Bricken et al. 2023, "Towards Monosemanticity").

  f = ReLU((x − b_dec) W_enc + b_enc)
  loss = ‖x − x̂‖² + λ ‖f‖₁

Decoder rows are kept at unit norm: the gradient component parallel to each row is removed before
the update, and rows are renormalised after it. b_dec starts at the geometric median of a sample;
W_enc = W_decᵀ at init.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.base import Forward, Params, SAEConfig, UnitNormDecoder, register, squared_error, tied_init
from sae.errors import require


@dataclasses.dataclass
class ReLUConfig(SAEConfig):
    name: str = "relu"
    l1_coefficient: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.l1_coefficient >= 0, f"sae.l1_coefficient={self.l1_coefficient} must be ≥ 0")


@register
@dataclasses.dataclass(frozen=True)
class ReLU(UnitNormDecoder):
    name = "relu"
    config = ReLUConfig
    saelens = "standard"
    pre_bias = True
    sparsity = "l1_coefficient"
    sweep = ("l1_coefficient",)

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        return tied_init(key, self.d_sae, self.d_in, b_dec)

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient) -> Forward:
        f = self.encode(params, x, buffers)
        x_hat = self.decode(params, f)
        return l1_loss(y, x_hat, f, jnp.sum(f, axis=-1), sparsity_coefficient, buffers)


def l1_loss(y, y_hat, f, penalty_per_token, coefficient, buffers) -> Forward:
    """‖y − ŷ‖² + λ·mean(penalty_per_token) for the L1 families (y = x for an SAE)."""
    mse = squared_error(y, y_hat)
    l1 = jnp.mean(penalty_per_token)
    active = f > 0
    return Forward(
        loss=mse + coefficient * l1,
        x_hat=y_hat,
        fire_counts=jnp.sum(active, axis=0, dtype=jnp.int32),
        l0=jnp.mean(jnp.sum(active, axis=-1)),
        terms={"mse_loss": mse, "l1_loss": l1},
        buffers=buffers,
    )
