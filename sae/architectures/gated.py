"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv 2404.16014).

  π_gate = (x − b_dec) W_gate + b_gate                          (which latents are active)
  π_mag  = exp(r_mag) ⊙ ((x − b_dec) W_gate) + b_mag            (their magnitudes; weights tied)
  f = 1[π_gate > 0] ⊙ ReLU(π_mag)                               (eq. 6)
  loss = ‖x − x̂‖² + λ ‖ReLU(π_gate)‖₁ + ‖x − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖²   (eq. 8)

sg is stop-gradient: the auxiliary term trains the gate path to reconstruct on its own. W_gate is
stored as `W_enc` (SAELens's name). Decoder rows unit norm, so the L1 term is not gamed by shrinking
W_dec; W_enc = W_decᵀ at init, b_dec from the geometric median.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.base import Forward, Params, UnitNormDecoder, register, squared_error, tied_init
from sae.architectures.relu import ReLUConfig


@dataclasses.dataclass
class GatedConfig(ReLUConfig):
    name: str = "gated"


@register
@dataclasses.dataclass(frozen=True)
class Gated(UnitNormDecoder):
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

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient) -> Forward:
        pi_gate, pi_mag = self.gate_and_magnitude(params, x)
        f = (pi_gate > 0) * jax.nn.relu(pi_mag)
        x_hat = self.decode(params, f)
        gate = jax.nn.relu(pi_gate)
        mse = squared_error(x, x_hat)
        l1 = jnp.mean(jnp.sum(gate, axis=-1))
        w_dec, b_dec = jax.lax.stop_gradient(params["W_dec"]), jax.lax.stop_gradient(params["b_dec"])
        aux = squared_error(x, gate @ w_dec + b_dec)
        active = f > 0
        return Forward(
            loss=mse + sparsity_coefficient * l1 + aux,
            x_hat=x_hat,
            fire_counts=jnp.sum(active, axis=0, dtype=jnp.int32),
            l0=jnp.mean(jnp.sum(active, axis=-1)),
            terms={"mse_loss": mse, "l1_loss": l1, "gate_aux_loss": aux},
            buffers=buffers,
        )
