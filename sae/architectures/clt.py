"""Cross-layer transcoder (Ameisen et al. 2025, "Circuit Tracing", transformer-circuits.pub, §Architecture).

With L layers, x^ℓ: [batch, d_in] the residual stream entering layer ℓ's MLP (its normalised input by
default) and y^ℓ: [batch, d_out] what that MLP adds, a batch is x: [batch, L, d_in], y: [batch, L, d_out]:

  h^ℓ = x^ℓ W_enc^ℓ + b_enc^ℓ                          W_enc^ℓ: [d_in, F] per layer (F = d_sae features each)
  a^ℓ = JumpReLU_θ^ℓ(h^ℓ)   or   ReLU(TopK_k(h^ℓ))      (activation = jumprelu | topk)
  ŷ^ℓ' = Σ_{ℓ ≤ ℓ'} a^ℓ W_dec^{ℓ→ℓ'} + b_dec^ℓ'         feature i of layer ℓ writes to layer ℓ and every later one
  loss = Σ_ℓ ‖y^ℓ − ŷ^ℓ‖²
         + λ Σ_ℓ Σ_i tanh(c ‖W_dec,i^ℓ‖ a_i^ℓ)          ‖W_dec,i^ℓ‖: feature i's decoders into layers ℓ..L−1,
                                                        concatenated (jumprelu only; λ warmed up over the run)
         + λ_P Σ_ℓ Σ_i ReLU(θ_i^ℓ − h_i^ℓ) ‖W_dec,i^ℓ‖   the pre-activation loss that revives dead features
                                                        (Anthropic's January 2025 update; jumprelu only)

The published settings are the defaults: c = 4, λ_P = 3e-6, bandwidth 2, θ initialised at 0.1. θ learns from
the JumpReLU's straight-through pseudo-gradient (jumprelu.py, eqs. 11–12 of Rajamanoharan et al.). The
decoders of source layer ℓ are one tensor W_dec_ℓ: [F, L − ℓ, d_out] (circuit-tracer's layout), so no
weight is stored for the ℓ' < ℓ pairs a CLT does not have. Init (the update's): W_enc ~ U(±1/√F),
W_dec ~ U(±1/√(L·d_out)), b_enc = 0, b_dec^ℓ = the mean of y^ℓ.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sae.architectures.base import SAE, Forward, Params, SAEConfig, register
from sae.architectures.jumprelu import jumprelu
from sae.architectures.sparse import fire_counts_from_indices, gather_sum, take_with_sparse_grad, top_k_of
from sae.errors import DataError, positive, require

ACTIVATIONS = ("jumprelu", "topk")


@dataclasses.dataclass
class CLTConfig(SAEConfig):
    name: str = "clt"
    normalize_activations: bool = True  # the published setting: inputs scaled to E‖x‖ = √d_in
    activation: str = "jumprelu"  # jumprelu | topk
    k: int = 16  # topk: active features per token and layer
    l0_coefficient: float = 0.03  # λ of the tanh penalty (jumprelu): L0 ≈ 8 per layer on the 2-layer stdlib LM
    tanh_scale: float = 4.0  # c
    preact_coefficient: float = 3e-6  # λ_P
    threshold_init: float = 0.1
    bandwidth: float = 2.0  # ε of the JumpReLU's rectangle kernel

    def check(self) -> None:
        super().check()
        require(self.activation in ACTIVATIONS, f"sae.activation={self.activation!r} must be jumprelu or topk")
        require(not self.skip, "sae.skip=true is for per-layer transcoders; a CLT has no skip path")
        require(0 < self.k <= self.d_sae, f"sae.k={self.k} must be in 1..sae.d_sae={self.d_sae}")
        for key in ("l0_coefficient", "tanh_scale", "preact_coefficient"):
            require(getattr(self, key) >= 0, f"sae.{key}={getattr(self, key)} must be ≥ 0")
        positive(self.threshold_init, "sae.threshold_init")
        positive(self.bandwidth, "sae.bandwidth")


def decoder_names(n_layers: int) -> list[str]:
    """The decoder tensors' names, one per source layer: W_dec_0 … W_dec_{L−1}."""
    return [f"W_dec_{layer}" for layer in range(n_layers)]


@register
@dataclasses.dataclass(frozen=True)
class CLT(SAE):
    name = "clt"
    config = CLTConfig
    saelens = "jumprelu"  # each layer's encoder alone is a JumpReLU / TopK encoder; CLTs export to circuit-tracer
    pre_bias = False
    sparsity = "l0_coefficient"
    cross_layer = True

    @property
    def n_latents(self) -> int:
        return self.n_layers * self.d_sae

    # --- parameters ---------------------------------------------------------------------------
    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        """b_dec: [L, d_out], the targets' means."""
        n, d_in, d_out, f = self.n_layers, self.d_in, self.d_out, self.d_sae
        keys = jax.random.split(key, n + 1)
        enc = 1 / jnp.sqrt(f)
        dec = 1 / jnp.sqrt(n * d_out)
        params = {
            "W_enc": jax.random.uniform(keys[0], (n, d_in, f), minval=-enc, maxval=enc),
            "b_enc": jnp.zeros((n, f)),
            "b_dec": jnp.asarray(b_dec, jnp.float32).reshape(n, d_out),
        }
        for layer, name in enumerate(decoder_names(n)):
            params[name] = jax.random.uniform(keys[layer + 1], (f, n - layer, d_out), minval=-dec, maxval=dec)
        if self.cfg.activation == "jumprelu":
            params["threshold"] = jnp.full((n, f), self.cfg.threshold_init)
        return params

    def decoder_norms(self, params: Params) -> jax.Array:
        """‖W_dec,i^ℓ‖ over the layers feature i of layer ℓ writes to, concatenated: [L · F] (layer-major)."""
        return self.layer_decoder_norms(params).reshape(-1)

    def layer_decoder_norms(self, params: Params) -> jax.Array:
        """[L, F]: the concatenated decoder norm of each layer's features."""
        return jnp.stack(
            [jnp.sqrt(jnp.sum(jnp.square(params[name].astype(jnp.float32)), axis=(1, 2))) for name in self._decoders]
        )

    def post_update(self, params: Params) -> Params:
        if "threshold" in params:
            return {**params, "threshold": jnp.maximum(params["threshold"], 0.0)}
        return params

    @property
    def _decoders(self) -> list[str]:
        return decoder_names(self.n_layers)

    # --- inference ------------------------------------------------------------------------------
    def preacts_layer(self, params: Params, layer: int, x: jax.Array) -> jax.Array:
        """h^ℓ = x W_enc^ℓ + b_enc^ℓ: x [n, d_in] -> [n, F]."""
        return x @ params["W_enc"][layer] + params["b_enc"][layer]

    def activate(self, params: Params, h: jax.Array, layer: int | None = None) -> jax.Array:
        """a = JumpReLU_θ(h) or ReLU(TopK_k(h)) over the last axis; h: [..., F] of one layer (layer given)
        or [..., L, F] of all."""
        if self.cfg.activation == "topk":  # the k-th largest of ReLU(h) per token and layer, by the top-k kernel
            rows = jax.lax.stop_gradient(h).reshape(-1, h.shape[-1])
            kth = top_k_of(rows, jnp.zeros(h.shape[-1], h.dtype), self.cfg.k)[0][:, -1]
            return jnp.where(h >= kth.reshape(*h.shape[:-1], 1), jax.nn.relu(h), 0.0)
        theta = params["threshold"] if layer is None else params["threshold"][layer]
        return jumprelu(h, theta, self.cfg.bandwidth)

    def encode_layer(self, params: Params, layer: int, x: jax.Array) -> jax.Array:
        """a^ℓ: x [n, d_in] (layer ℓ's input) -> [n, F]."""
        return self.activate(params, self.preacts_layer(params, layer, x), layer)

    def decode_layer(self, params: Params, acts: list[jax.Array], layer: int) -> jax.Array:
        """ŷ^ℓ' = Σ_{ℓ ≤ ℓ'} a^ℓ W_dec^{ℓ→ℓ'} + b_dec^ℓ': acts [n, F] of layers 0..ℓ' -> [n, d_out]."""
        out = params["b_dec"][layer]
        for source, a in enumerate(acts[: layer + 1]):
            out = out + a @ params[f"W_dec_{source}"][:, layer - source]
        return out

    def encode(self, params: Params, x: jax.Array, buffers: dict[str, jax.Array]) -> jax.Array:
        """x: [..., L, d_in] -> a: [..., L, F]; DataError naming the expected shape for another."""
        x = self.check_layers("encode", "x", x, "d_in")
        h = jnp.einsum("...ld,ldf->...lf", x, params["W_enc"]) + params["b_enc"]
        return self.activate(params, h)

    def decode(self, params: Params, f: jax.Array) -> jax.Array:
        """a: [..., L, F] -> ŷ: [..., L, d_out]."""
        f = self.check_layers("decode", "f", f, "d_sae")
        n = self.n_layers
        out = jnp.broadcast_to(params["b_dec"], (*f.shape[:-2], n, self.d_out))
        for source, name in enumerate(self._decoders):
            written = jnp.einsum("...f,fmd->...md", f[..., source, :], params[name])  # layers source..L−1
            out = out.at[..., source:, :].add(written)
        return out

    def check_layers(self, where: str, name: str, a, width_name: str) -> jax.Array:
        """a as [..., n_layers, width] floating point (width: the field width_name), else DataError in one line."""
        width = getattr(self, width_name)
        a = jnp.asarray(a) if not hasattr(a, "shape") else a
        if a.ndim < 2 or a.shape[-2:] != (self.n_layers, width) or not jnp.issubdtype(a.dtype, jnp.floating):
            raise DataError(
                f"{where}: {name} has shape {tuple(a.shape)} and dtype {a.dtype}; expected floating point "
                f"(..., n_layers={self.n_layers}, {width_name}={width})"
            )
        return a

    # --- training -------------------------------------------------------------------------------
    def forward(self, params, buffers, x, y, dead, sparsity_coefficient) -> Forward:
        if self.cfg.activation == "topk":
            y_hat, active_per_layer, fire_counts = self._sparse_topk(params, x)
            mse = jnp.mean(jnp.sum(jnp.square(y - y_hat), axis=(-2, -1)))
            return self._forward(mse, {}, active_per_layer, fire_counts, y_hat, buffers)
        h = jnp.einsum("bld,ldf->blf", x, params["W_enc"]) + params["b_enc"]
        a = self.activate(params, h)
        y_hat = self.decode(params, a)
        mse = jnp.mean(jnp.sum(jnp.square(y - y_hat), axis=(-2, -1)))
        norms = self.layer_decoder_norms(params)  # [L, F]
        tanh = jnp.mean(jnp.sum(jnp.tanh(self.cfg.tanh_scale * norms * a), axis=(-2, -1)))
        preact = jnp.mean(jnp.sum(jax.nn.relu(params["threshold"] - h) * norms, axis=(-2, -1)))
        penalties = {"tanh_loss": (tanh, sparsity_coefficient), "preact_loss": (preact, self.cfg.preact_coefficient)}
        active = a != 0
        fire_counts = jnp.sum(active, axis=0, dtype=jnp.int32).reshape(-1)
        return self._forward(mse, penalties, jnp.sum(active, axis=-1), fire_counts, y_hat, buffers)

    def _forward(self, mse, penalties: dict, active_per_layer, fire_counts, y_hat, buffers) -> Forward:
        """The Forward of a loss mse + Σ coefficient · term; active_per_layer: [batch, L] features active."""
        per_layer = jnp.mean(active_per_layer, axis=0)  # [L]
        terms = {"mse_loss": mse, **{name: term for name, (term, _) in penalties.items()}}
        terms.update({f"l0_layer_{layer}": per_layer[layer] for layer in range(self.n_layers)})
        return Forward(
            loss=sum((c * term for term, c in penalties.values()), mse),
            x_hat=y_hat,
            fire_counts=fire_counts,
            l0=jnp.mean(per_layer),
            terms=terms,
            buffers=buffers,
        )

    def _sparse_topk(self, params, x):
        """The TopK CLT's training pass with the TopK SAE's sparse operations (sparse.py): per layer one dense
        matmul x^ℓ W_enc^ℓ without gradient, the top k chosen on it, their values read with the encoder's
        gradient sent to those k columns, and ŷ from k gathered decoder rows [(L − ℓ)·d_out] per token.
        Returns (ŷ [batch, L, d_out], active features [batch, L], fire counts [L · F])."""
        n, f = self.n_layers, self.d_sae
        y_hat = jnp.broadcast_to(params["b_dec"], (x.shape[0], n, self.d_out))
        active, counts = [], []
        for layer in range(n):
            w_enc, b_enc, x_l = params["W_enc"][layer], params["b_enc"][layer], x[:, layer]
            xw = jax.lax.stop_gradient(x_l @ w_enc)
            _, idx = top_k_of(xw, jax.lax.stop_gradient(b_enc), self.cfg.k)
            vals = jax.nn.relu(take_with_sparse_grad(xw, x_l, w_enc, idx) + b_enc[idx])
            w_dec = params[f"W_dec_{layer}"].reshape(f, (n - layer) * self.d_out)
            written = gather_sum(vals, w_dec, idx).reshape(x.shape[0], n - layer, self.d_out)
            y_hat = y_hat.at[:, layer:].add(written)
            active.append(jnp.sum(vals > 0, axis=-1))
            counts.append(fire_counts_from_indices(vals, idx, f))
        return y_hat, jnp.stack(active, axis=-1), jnp.concatenate(counts)
