"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv 2404.16014).

  π_gate = (x − b_dec) W_gate + b_gate                          (which latents are active)
  π_mag  = exp(r_mag) ⊙ ((x − b_dec) W_gate) + b_mag            (their magnitudes; weights tied)
  f = 1[π_gate > 0] ⊙ ReLU(π_mag)                               (eq. 6)
  loss = ‖x − x̂‖² + λ ‖ReLU(π_gate)‖₁ + ‖x − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖²   (eq. 8)

sg is stop-gradient: the auxiliary term trains the gate path to reconstruct on its own. W_gate is
stored as `W_enc` (SAELens's name). Decoder rows unit norm, so the L1 term is not gamed by shrinking
W_dec; W_enc = W_decᵀ at init, b_dec from the geometric median.

The step is sparse once the code is (capacity.py): a latent takes a slot where its gate is open (π_gate > 0),
which holds f, the L1 term and the auxiliary decode alike; a row with more open gates than every capacity
makes the step dense. Every path is exact.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.base import (
    Forward,
    Params,
    UnitNormDecoder,
    decode_sparse,
    register,
    squared_error,
    tied_init,
)
from sae.architectures.capacity import CapacityRoute
from sae.architectures.relu import ReLUConfig
from sae.architectures.sparse import fire_counts_from_indices, gather_sum, matmul_from, take_with_sparse_grad


@dataclasses.dataclass
class GatedConfig(ReLUConfig):
    name: str = "gated"


@register
@dataclasses.dataclass(frozen=True)
class Gated(CapacityRoute, UnitNormDecoder):
    name = "gated"
    config = GatedConfig
    saelens = "gated"
    pre_bias = True
    transcodes = False  # gate and magnitude share x − b_dec; SAELens has no gated transcoder
    sparsity = "l1_coefficient"
    sweep = ("l1_coefficient",)

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        params = tied_init(key, self.d_sae, self.d_in, b_dec)
        zeros = lambda: jnp.zeros((self.d_sae,))  # distinct buffers: the train step donates them
        return {
            "W_enc": params["W_enc"],
            "b_gate": zeros(),
            "r_mag": zeros(),
            "b_mag": zeros(),
            "W_dec": params["W_dec"],
            "b_dec": params["b_dec"],
        }

    def gate_and_magnitude(self, params, x):
        """(π_gate, π_mag): [batch, d_sae] each; one shared matmul."""
        shared = x @ params["W_enc"] - params["b_dec"] @ params["W_enc"]
        return shared + params["b_gate"], jnp.exp(params["r_mag"]) * shared + params["b_mag"]

    def slot_bias(self, params):
        """π_gate = x W_gate + (b_gate − b_dec W_gate) > 0: the open gates."""
        return params["b_gate"] - params["b_dec"] @ params["W_enc"]

    def dense_forward(self, params, buffers, x, y, coefficient, xw) -> Forward:
        shared = matmul_from(xw, x, params["W_enc"]) - params["b_dec"] @ params["W_enc"]
        pi_gate, pi_mag = shared + params["b_gate"], jnp.exp(params["r_mag"]) * shared + params["b_mag"]
        f = (pi_gate > 0) * jax.nn.relu(pi_mag)
        gate = jax.nn.relu(pi_gate)
        w_dec, b_dec = jax.lax.stop_gradient(params["W_dec"]), jax.lax.stop_gradient(params["b_dec"])
        active = f > 0
        counts = jnp.sum(active, axis=0, dtype=jnp.int32)
        return self._loss(x, self.decode(params, f), gate, gate @ w_dec + b_dec, coefficient, buffers, counts, active)

    def sparse_forward(self, params, buffers, x, y, coefficient, xw, idx) -> Forward:
        slot = idx >= 0  # idx: [batch, C] the open gates' latents, −1 empty
        shared = take_with_sparse_grad(xw, x, params["W_enc"], idx) - (params["b_dec"] @ params["W_enc"])[idx]
        pi_gate = shared + params["b_gate"][idx]
        pi_mag = jnp.exp(params["r_mag"][idx]) * shared + params["b_mag"][idx]
        f = jnp.where(slot & (pi_gate > 0), jax.nn.relu(pi_mag), 0.0)
        gate = jnp.where(slot, jax.nn.relu(pi_gate), 0.0)
        w_dec, b_dec = jax.lax.stop_gradient(params["W_dec"]), jax.lax.stop_gradient(params["b_dec"])
        counts = fire_counts_from_indices(f, idx, self.d_sae)
        x_hat, via_gate = decode_sparse(params, f, idx), gather_sum(gate, w_dec, idx) + b_dec
        return self._loss(x, x_hat, gate, via_gate, coefficient, buffers, counts, f > 0)

    def _loss(self, x, x_hat, gate, via_gate, coefficient, buffers, fire_counts, active) -> Forward:
        """gate: ReLU(π_gate) (dense or on the slots); via_gate: its reconstruction through sg(W_dec)."""
        mse = squared_error(x, x_hat)
        l1 = jnp.mean(jnp.sum(gate, axis=-1))
        aux = squared_error(x, via_gate)
        return Forward(
            loss=mse + coefficient * l1 + aux,
            x_hat=x_hat,
            fire_counts=fire_counts,
            l0=jnp.sum(active) / x.shape[0],
            terms={"mse_loss": mse, "l1_loss": l1, "gate_aux_loss": aux},
            buffers=buffers,
        )
