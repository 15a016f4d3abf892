"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

  z = (x − b_dec) W_enc + b_enc,  r = ReLU(z)
  training:   f = r · 1[r ≥ τ_batch], τ_batch the (k·batch)-th largest entry of r over the whole batch
  inference:  f = r · 1[r > θ], θ = EMA of the smallest kept activation (τ_batch) during training (§3)
  loss = ‖x − x̂‖² + α L_aux (AuxK as in TopK, α = 1/32)

So the batch, not each token, has k·batch active latents: L0 averages k but varies per token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.auxk import auxk_loss
from sae.architectures.base import (
    Forward,
    Params,
    UnitNormDecoder,
    encoder_bias,
    register,
    squared_error,
    tied_init,
    topk_family_lr,
)
from sae.architectures.sparse import top_k_of
from sae.architectures.topk import TopKConfig
from sae.errors import require


@dataclasses.dataclass
class BatchTopKConfig(TopKConfig):
    name: str = "batchtopk"
    threshold_ema_decay: float = 0.99  # SAELens's topk_threshold_lr = 0.01

    def check(self) -> None:
        super().check()
        require(
            0 <= self.threshold_ema_decay < 1, f"sae.threshold_ema_decay={self.threshold_ema_decay} must be in [0, 1)"
        )


def kth_largest_nonnegative(r: jax.Array, n: int) -> jax.Array:
    """Exact n-th largest entry of a non-negative array by radix select on its float32 bit pattern
    (monotone for non-negative floats): four passes, each a 256-bin histogram of the next 8 bits
    among the entries that share the bits chosen so far. No sort."""
    bits = jax.lax.bitcast_convert_type(r.astype(jnp.float32), jnp.int32).reshape(-1)
    bits = jnp.maximum(bits, 0)  # −0.0 has the sign bit set; rank it as 0
    prefix, remaining = jnp.int32(0), jnp.int32(n)  # the answer's bits so far; rank within the prefix
    for shift in (24, 16, 8, 0):
        match = (bits >> (shift + 8)) == (prefix >> (shift + 8)) if shift < 24 else True
        digit = (bits >> shift) & 255
        counts = jnp.zeros(257, jnp.int32).at[jnp.where(match, digit, 256)].add(1)[:256]
        at_least = jnp.cumsum(counts[::-1])[::-1]  # at_least[d]: matching entries with digit ≥ d
        d = jnp.sum(at_least >= remaining) - 1  # the largest digit still holding the n-th entry
        remaining = remaining - jnp.where(d < 255, at_least[jnp.minimum(d + 1, 255)], 0)
        prefix = prefix | (d << shift)
    return jax.lax.bitcast_convert_type(prefix, jnp.float32)


def batch_threshold(r: jax.Array, k: int) -> jax.Array:
    """τ: the (k·batch)-th largest entry of r: [batch, d_sae] (non-negative), exactly.

    Selects over each row's top-4k candidates. A row whose 4k-th candidate reaches that τ may hold
    more of the batch's top entries than it offered ("overflows"): up to batch/32 such rows join the
    pool in full (their candidates dropped) and τ is recomputed; beyond that the whole array is
    searched. A row not overflowing at τ cannot overflow at the recomputed τ' ≥ τ, so each is exact.
    """
    batch, d_sae = r.shape
    n = k * batch
    n_candidates = min(4 * k, d_sae)
    candidates, _ = top_k_of(r, jnp.zeros((d_sae,), r.dtype), n_candidates, relu=False)
    tau = kth_largest_nonnegative(candidates, n)
    if n_candidates == d_sae:
        return tau
    last = candidates[:, -1]
    overflow = (last >= tau) & (last > 0)
    n_overflow = jnp.sum(overflow)
    max_rows = max(1, batch // 32)

    def with_full_rows():
        _, rows = jax.lax.top_k(overflow.astype(jnp.float32), max_rows)  # the overflowing rows first
        valid = overflow[rows]
        pool = jnp.concatenate(
            [
                jnp.where(overflow[:, None], 0.0, candidates).reshape(-1),
                jnp.where(valid[:, None], r[rows], 0.0).reshape(-1),
            ]
        )
        return kth_largest_nonnegative(pool, n)

    branch = jnp.where(n_overflow == 0, 0, jnp.where(n_overflow <= max_rows, 1, 2))
    return jax.lax.switch(branch, [lambda: tau, with_full_rows, lambda: kth_largest_nonnegative(r, n)])


def update_threshold(threshold: jax.Array, tau: jax.Array, decay: float) -> jax.Array:
    """EMA of the batch threshold; the first batch (threshold < 0: unset) sets it."""
    return jnp.where(threshold < 0, tau, decay * threshold + (1 - decay) * tau)


@register
@dataclasses.dataclass(frozen=True)
class BatchTopK(UnitNormDecoder):
    name = "batchtopk"
    config = BatchTopKConfig
    saelens = "jumprelu"  # inference: ReLU(z) · 1[z > θ], θ the scalar threshold broadcast to [d_sae]
    pre_bias = True

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        return tied_init(key, self.d_sae, self.d_in, b_dec)

    def init_buffers(self):
        return {"threshold": jnp.array(-1.0)}

    def inference_params(self, params, buffers):
        """r · 1[r > θ] with r = ReLU(z) is SAELens's ReLU(z) · 1[z > θ] for θ ≥ 0, and ReLU(z) for θ < 0 (the
        unset sentinel), which is θ = 0: so the threshold is max(θ, 0), exactly."""
        theta = jnp.maximum(jnp.reshape(buffers["threshold"], ()), 0.0)
        kept = {name: params[name] for name in ("W_enc", "W_dec", "b_dec", "b_enc")}
        return {**kept, "threshold": jnp.full((self.d_sae,), theta)}

    def default_lr(self) -> float:
        return topk_family_lr(self.d_sae)

    def batch_code(self, params, buffers, x):
        """(f: [batch, d_sae] with k·batch active entries, x W_enc without gradient, updated buffers)."""
        xw = x @ params["W_enc"]
        r = jax.nn.relu(xw + encoder_bias(params, self.applies_pre_bias))
        tau = batch_threshold(jax.lax.stop_gradient(r), self.cfg.k)
        f = r * ((r >= tau) & (r > 0))
        # θ tracks the smallest kept activation: τ itself, except when fewer than k·batch entries are
        # positive (τ = 0, all positives kept), then the smallest positive one (0 if none), as in
        # dictionary_learning's BatchTopK trainer.
        smallest = jnp.min(jnp.where(f > 0, jax.lax.stop_gradient(f), jnp.inf))
        kept_min = jnp.where(jnp.isfinite(smallest), smallest, 0.0)
        threshold = update_threshold(buffers["threshold"], kept_min, self.cfg.threshold_ema_decay)
        return f, jax.lax.stop_gradient(xw), {**buffers, "threshold": threshold}

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient) -> Forward:
        f, xw, buffers = self.batch_code(params, buffers, x)
        x_hat = self.decode(params, f)
        return dense_topk_family_loss(self, params, buffers, x, y, x_hat, xw, f, dead, {})


def dense_topk_family_loss(sae, params, buffers, x, y, x_hat, xw, f, dead, extra_terms) -> Forward:
    """‖y − ŷ‖² (+ extra terms) + α·AuxK for a dense code f: [batch, d_sae]; xw = x W_enc (no gradient)."""
    mse = squared_error(y, x_hat)
    aux = auxk_loss(params, x, y, x_hat, xw, dead, sae.cfg.k_aux or sae.d_out // 2, sae.applies_pre_bias)
    loss = sum(extra_terms.values(), mse) + sae.cfg.aux_coefficient * aux
    active = f > 0
    return Forward(
        loss=loss,
        x_hat=x_hat,
        fire_counts=jnp.sum(active, axis=0, dtype=jnp.int32),
        l0=jnp.mean(jnp.sum(active, axis=-1)),
        terms={"mse_loss": mse, "auxk_loss": aux, **extra_terms},
        buffers=buffers,
    )
