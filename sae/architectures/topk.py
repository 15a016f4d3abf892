"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).

  z = (x − b_dec) W_enc + b_enc                          (eq. 2's pre-activations, pre-bias b_dec)
  f = TopK(ReLU(z))                                      keeps the k largest per token (eq. 3)
  loss = ‖y − ŷ‖² + α L_aux,  α = 1/32                   (§2.4 and §A.2; y = x for an SAE)
  L_aux = ‖e − ê‖² Var(y)/Var(e), e = y − ŷ, ê = W_decᵀ TopK_aux(z_dead)  (k_aux dead latents; the
          normalisation of the paper's code: α weighs the residual's normalised MSE against y's)

Tied init W_enc = W_decᵀ, unit-norm decoder rows (gradient projected, rows renormalised after each
step), b_dec from the geometric median of a data sample. Only k latents per token are touched in the
backward pass (see `base.take_with_sparse_grad`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.auxk import auxk_loss
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
    topk_family_lr,
)
from sae.architectures.sparse import fire_counts_from_indices, top_k_of
from sae.errors import require


@dataclasses.dataclass
class TopKConfig(SAEConfig):
    name: str = "topk"
    k: int = 6
    k_aux: int | None = None  # None: d_out // 2 (Gao et al.: d_model / 2)
    aux_coefficient: float = 1.0 / 32

    def check(self) -> None:
        super().check()
        require(0 < self.k <= self.d_sae, f"sae.k={self.k} must be in 1..sae.d_sae={self.d_sae}")
        require(
            self.k_aux is None or 0 < self.k_aux <= self.d_sae,
            f"sae.k_aux={self.k_aux} must be null or in 1..sae.d_sae={self.d_sae}",
        )
        require(self.aux_coefficient >= 0, f"sae.aux_coefficient={self.aux_coefficient} must be ≥ 0")


def _within_own_k(width: int, buffers: dict) -> jax.Array:
    """[width] bool: the slots of a top-k row within this instance's k (a sweep over k keeps it in
    buffers["k"] ≤ cfg.k)."""
    return jnp.arange(width) < buffers["k"]


def keep_first_k(vals: jax.Array, buffers: dict) -> jax.Array:
    """In a sweep over k, zero all but the k largest of each row. vals: [batch, cfg.k], sorted in
    decreasing order by the top-k."""
    if "k" not in buffers:
        return vals
    return jnp.where(_within_own_k(vals.shape[-1], buffers), vals, 0.0)


def drop_past_k(idx: jax.Array, buffers: dict) -> jax.Array:
    """In a sweep over k, index −1 for the slots past this instance's k: the CPU kernels skip them, so
    an instance pays the sparse ops for its own k, not the sweep's largest (their values are zeroed by
    `keep_first_k`, so XLA's ops, which read index −1 as the last latent, add nothing from them)."""
    if "k" not in buffers:
        return idx
    return jnp.where(_within_own_k(idx.shape[-1], buffers), idx, -1)


@register
@dataclasses.dataclass(frozen=True)
class TopK(UnitNormDecoder):
    name = "topk"
    config = TopKConfig
    saelens = "topk"
    pre_bias = True
    sweep = ("k",)

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        return tied_init(key, self.d_sae, self.d_in, b_dec)

    def default_lr(self) -> float:
        return topk_family_lr(self.d_sae)

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient) -> Forward:
        xw = jax.lax.stop_gradient(x @ params["W_enc"])  # the step's one dense matmul
        _, idx = top_k_of(xw, jax.lax.stop_gradient(encoder_bias(params, self.applies_pre_bias)), self.cfg.k)
        idx = drop_past_k(idx, buffers)
        vals = keep_first_k(jax.nn.relu(selected_preacts(params, x, xw, idx, self.applies_pre_bias)), buffers)
        x_hat = decode_sparse(params, vals, idx)
        mse = squared_error(y, x_hat)
        aux = auxk_loss(params, x, y, x_hat, xw, dead, self.cfg.k_aux or self.d_out // 2, self.applies_pre_bias)
        return Forward(
            loss=mse + self.cfg.aux_coefficient * aux,
            x_hat=x_hat,
            fire_counts=fire_counts_from_indices(vals, idx, self.d_sae),
            l0=jnp.mean(jnp.sum(vals > 0, axis=-1)),
            terms={"mse_loss": mse, "auxk_loss": aux},
            buffers=buffers,
        )
