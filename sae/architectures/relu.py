"""ReLU SAE with L1 penalty and unit-norm decoder (Bricken et al. 2023, "Towards Monosemanticity").

  f = ReLU((x − b_dec) W_enc + b_enc)
  loss = ‖x − x̂‖² + λ ‖f‖₁

Decoder rows are kept at unit norm: the gradient component parallel to each row is removed before
the update, and rows are renormalised after it. b_dec starts at the geometric median of a sample;
W_enc = W_decᵀ at init.

The step is sparse once the code is (`SparseReLUCode`): each row's active latents are the positive ones
among its top C pre-activations, C the smallest of CAPACITIES above the batch's widest row; decoded by a
gather-sum, the encoder's gradient scattered into their columns, the penalty on them alone. A batch with a
row wider than every capacity (early in training, when codes are dense) steps densely. Every path is exact.
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
    encoder_bias,
    register,
    selected_preacts,
    squared_error,
    tied_init,
)
from sae.architectures.sparse import fire_counts_from_indices, matmul_from, top_k_of
from sae.errors import require

CAPACITIES = (64, 256)  # active latents per row the sparse paths hold (each path compiles once)


@dataclasses.dataclass
class ReLUConfig(SAEConfig):
    name: str = "relu"
    l1_coefficient: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.l1_coefficient >= 0, f"sae.l1_coefficient={self.l1_coefficient} must be ≥ 0")


class SparseReLUCode:
    """The sparse step of a code f = ReLU(z) with an L1-type penalty (ReLU, ReLUApril): paths 0 … n − 1 hold
    CAPACITIES[i] latents per row (those below d_sae), path n is dense. A family gives `penalty(params, f)`
    for a dense code and `sparse_penalty(params, vals, idx)` for (values, indices) [batch, C]."""

    def capacities(self) -> tuple[int, ...]:
        return tuple(c for c in CAPACITIES if c < self.d_sae)

    @property
    def paths(self) -> int:
        return len(self.capacities()) + 1

    def route(self, params, buffers, x):
        return self._plan(params, x)

    def _plan(self, params, x):
        """(the first path whose capacity holds the batch's widest row, else the dense one; (x W_enc, that
        path's top C ReLU'd pre-activations and their indices, padded to [batch, C_max] with index −1)),
        without gradient. The dense path skips the top-k."""
        caps = self.capacities()
        xw = jax.lax.stop_gradient(x @ params["W_enc"])  # the sparse step's one dense matmul
        if not caps:
            return jnp.int32(0), (xw, None, None)
        bias = jax.lax.stop_gradient(encoder_bias(params, self.applies_pre_bias))
        widest = jnp.max(jnp.sum(xw + bias > 0, axis=-1))
        path = jnp.sum(jnp.asarray(caps) < widest).astype(jnp.int32)  # the first capacity ≥ it; len(caps): dense

        def top(c):
            def fn():
                vals, idx = top_k_of(xw, bias, c)
                pad = ((0, 0), (0, caps[-1] - c))
                return jnp.pad(vals, pad), jnp.pad(idx, pad, constant_values=-1)

            return fn

        empty = lambda: (jnp.zeros((x.shape[0], caps[-1]), xw.dtype), jnp.full((x.shape[0], caps[-1]), -1, jnp.int32))
        vals, idx = jax.lax.switch(path, [*(top(c) for c in caps), empty])
        return path, (xw, vals, idx)

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient, route=None) -> Forward:
        if route is None:  # outside the train step: choose here
            path, plan = self._plan(params, x)
            paths = [
                partial(self._forward, params, buffers, x, y, sparsity_coefficient, plan, i) for i in range(self.paths)
            ]
            return jax.lax.switch(path, paths)
        path, plan = route
        return self._forward(params, buffers, x, y, sparsity_coefficient, plan, path)

    def _forward(self, params, buffers, x, y, coefficient, plan, path: int) -> Forward:
        caps = self.capacities()
        xw = plan[0]
        if path == len(caps):  # the route's x W_enc, with a matmul's gradient
            f = jax.nn.relu(matmul_from(xw, x, params["W_enc"]) + encoder_bias(params, self.applies_pre_bias))
            x_hat = self.decode(params, f)
            active = f > 0
            counts = jnp.sum(active, axis=0, dtype=jnp.int32)
            return l1_loss(y, x_hat, self.penalty(params, f), coefficient, buffers, counts, jnp.sum(active))
        xw, vals, idx = plan
        kept = vals[:, : caps[path]] > 0
        idx = jnp.where(kept, idx[:, : caps[path]], -1)  # −1: an empty slot, skipped by the kernels
        v = jnp.where(kept, jax.nn.relu(selected_preacts(params, x, xw, idx, self.applies_pre_bias)), 0.0)
        x_hat = decode_sparse(params, v, idx)
        counts = fire_counts_from_indices(v, idx, self.d_sae)
        penalty = self.sparse_penalty(params, v, idx)
        return l1_loss(y, x_hat, penalty, coefficient, buffers, counts, jnp.sum(v > 0))


@register
@dataclasses.dataclass(frozen=True)
class ReLU(SparseReLUCode, UnitNormDecoder):
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
