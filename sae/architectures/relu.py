"""ReLU SAE with L1 penalty and unit-norm decoder (Bricken et al. 2023, "Towards Monosemanticity").

  f = ReLU((x − b_dec) W_enc + b_enc)
  loss = ‖x − x̂‖² + λ ‖f‖₁

Decoder rows are kept at unit norm: the gradient component parallel to each row is removed before
the update, and rows are renormalised after it. b_dec starts at the geometric median of a sample;
W_enc = W_decᵀ at init.

The step is sparse once the code is (`ReLUCode`, capacity.py): each row's active latents in at most C
slots, decoded by a gather-sum, the encoder's gradient scattered into their columns, the penalty on them
alone; a batch with a row wider than every capacity (early in training) steps densely. Every path is exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.base import (
    Forward,
    Params,
    SAEConfig,
    UnitNormDecoder,
    decode_sparse,
    encoder_bias,
    register,
    selected_preacts,
    squared_error,
    tied_init,
)
from sae.architectures.capacity import CapacityRoute
from sae.architectures.sparse import fire_counts_from_indices, matmul_from
from sae.errors import require


@dataclasses.dataclass
class ReLUConfig(SAEConfig):
    name: str = "relu"
    l1_coefficient: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.l1_coefficient >= 0, f"sae.l1_coefficient={self.l1_coefficient} must be ≥ 0")


class ReLUCode(CapacityRoute):
    """The step of a code f = ReLU(z) with an L1-type penalty (ReLU, ReLUApril), sparse once the code is
    (capacity.py): a slot is an active latent. A family gives `penalty(params, f)` for a dense code and
    `sparse_penalty(params, vals, idx)` for (values, indices) [batch, C]."""

    def slot_bias(self, params):
        return encoder_bias(params, self.applies_pre_bias)

    def dense_forward(self, params, buffers, x, y, coefficient, xw) -> Forward:
        f = jax.nn.relu(matmul_from(xw, x, params["W_enc"]) + encoder_bias(params, self.applies_pre_bias))
        x_hat = self.decode(params, f)
        active = f > 0
        counts = jnp.sum(active, axis=0, dtype=jnp.int32)
        return l1_loss(y, x_hat, self.penalty(params, f), coefficient, buffers, counts, jnp.sum(active))

    def sparse_forward(self, params, buffers, x, y, coefficient, xw, idx) -> Forward:
        v = jnp.where(idx >= 0, jax.nn.relu(selected_preacts(params, x, xw, idx, self.applies_pre_bias)), 0.0)
        x_hat = decode_sparse(params, v, idx)
        counts = fire_counts_from_indices(v, idx, self.d_sae)
        return l1_loss(y, x_hat, self.sparse_penalty(params, v, idx), coefficient, buffers, counts, jnp.sum(v > 0))


@register
@dataclasses.dataclass(frozen=True)
class ReLU(ReLUCode, UnitNormDecoder):
    name = "relu"
    config = ReLUConfig
    saelens = "standard"
    pre_bias = True
    sparsity = "l1_coefficient"
    sweep = ("l1_coefficient",)

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        return tied_init(key, self.d_sae, self.d_in, b_dec)

    def penalty(self, params, f):
        return jnp.sum(f, axis=-1)

    def sparse_penalty(self, params, vals, idx):
        return jnp.sum(vals, axis=-1)


def l1_loss(y, y_hat, penalty_per_token, coefficient, buffers, fire_counts, n_active) -> Forward:
    """‖y − ŷ‖² + λ·mean(penalty_per_token) for the L1 families (y = x for an SAE); n_active: the code's
    firing entries in the batch (L0 is their mean per row)."""
    mse = squared_error(y, y_hat)
    l1 = jnp.mean(penalty_per_token)
    return Forward(
        loss=mse + coefficient * l1,
        x_hat=y_hat,
        fire_counts=fire_counts,
        l0=n_active / y.shape[0],
        terms={"mse_loss": mse, "l1_loss": l1},
        buffers=buffers,
    )
