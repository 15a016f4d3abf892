"""ReLU SAE, Anthropic's April 2024 recipe (Circuits Updates, April 2024; SAELens "standard",
dictionary_learning's StandardTrainerAprilUpdate).

  f = ReLU(x W_enc + b_enc)                    (no pre-bias)
  loss = ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖        (decoder norms inside the penalty, no constraint)

Init: W_dec rows random with norm 0.1, W_enc = W_decᵀ, biases 0. The recipe's other parts live in the
trainer and config: inputs scaled so E‖x‖ = √d_in (`sae.normalize_activations`), λ warmed up over the
first 5%, lr decayed linearly to 0 over the last 20%, gradient norm clipped at 1. The step is sparse once
the code is, as ReLU's (relu.py, `ReLUCode`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.base import SAE, Params, register, tied_init
from sae.architectures.relu import ReLUCode, ReLUConfig


@dataclasses.dataclass
class ReLUAprilConfig(ReLUConfig):
    name: str = "relu_april"
    normalize_activations: bool = True  # the recipe scales inputs so E‖x‖ = √d_in


@register
@dataclasses.dataclass(frozen=True)
class ReLUApril(ReLUCode, SAE):
    name = "relu_april"
    config = ReLUAprilConfig
    saelens = "standard"
    pre_bias = False
    sparsity = "l1_coefficient"
    sweep = ("l1_coefficient",)

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        return tied_init(key, self.d_sae, self.d_in, jnp.zeros_like(b_dec), row_norm=0.1)

    def penalty(self, params, f):
        return f @ jnp.linalg.norm(params["W_dec"], axis=-1)

    def sparse_penalty(self, params, vals, idx):
        return jnp.sum(vals * jnp.linalg.norm(params["W_dec"], axis=-1)[idx], axis=-1)
