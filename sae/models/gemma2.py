"""Gemma 2 (Gemma Team 2024; transformers' `gemma2`): llama.py's attention and gated MLP with Gemma's norms,
scalings and soft-caps.

The embedding is scaled by √d_model (rounded to the activation dtype, as transformers does); every RMSNorm
scales by (1 + γ) (γ stored as γ − 1) in float32; each sub-layer is normalised before and after. Block l,
on the residual stream x: [batch, seq, d_model], with N_in, N_pa, N_pf, N_pff its four norms (input_layernorm,
post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm):

    attn_out   = N_pa(Attn(N_in(x)))           scores · query_pre_attn_scalar^−½, then c·tanh(scores / c),
                                               c = attn_logit_softcapping; grouped-query, rotary q and k
    resid_mid  = x + attn_out
    ln2.hook_normalized = N_pf(resid_mid)
    mlp.hook_pre  = N_pf(resid_mid) W_gate     W_gate, W_up: [d, d_mlp]
    mlp.hook_post = act(mlp.hook_pre) · N_pf(resid_mid) W_up   act: hidden_activation (gelu_pytorch_tanh: GeGLU)
    mlp_out    = N_pff(mlp.hook_post W_down)   W_down: [d_mlp, d]
    resid_post = resid_mid + mlp_out

Layers alternate local and global attention: those that layer_types marks 'sliding_attention' (by default
layers 0, 2, 4, …) see only their last sliding_window positions. logits = c_f·tanh(N_f(x) W_E^T / c_f),
c_f = final_logit_softcapping, with the embedding W_E tied (tie_word_embeddings; else lm_head).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sae.models.base import FAMILIES, Family, Hooks, ModelError
from sae.models.layers import RMSNorm
from sae.models.llama import Attention, GatedMLP, Llama, LlamaConfig, layer_windows

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclasses.dataclass(frozen=True)
class Gemma2Config(LlamaConfig):
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, c: dict) -> Gemma2Config:
        if c.get("use_bidirectional_attention"):
            raise ModelError("config.json: use_bidirectional_attention=true is not supported for gemma2")
        n = c["num_hidden_layers"]
        bias = bool(c.get("attention_bias", False))
        return cls(
            **cls.fields_from_hf(c, "gemma2", "hidden_activation", "gelu_pytorch_tanh"),
            # transformers' default: layers 0, 2, 4, … slide
            windows=layer_windows(c, ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]),
            qkv_bias=bias,
            o_bias=bias,
            tie_word_embeddings=c.get("tie_word_embeddings", True),
            query_pre_attn_scalar=c.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=c.get("attn_logit_softcapping"),
            final_logit_softcapping=c.get("final_logit_softcapping"),
        )


class Block(nnx.Module):
    def __init__(self, w, name: str, c: Gemma2Config, layer: int):
        for norm in NORMS:
            setattr(self, norm, RMSNorm(w, f"{name}.{norm}", c.d_model, c.rms_norm_eps, offset=1.0))
        scale, cap = c.query_pre_attn_scalar**-0.5, c.attn_logit_softcapping
        self.self_attn = Attention(w, f"{name}.self_attn", c, c.windows[layer], scale, cap)
        self.mlp = GatedMLP(w, f"{name}.mlp", c, act_field="hidden_activation")

    def __call__(self, x: jax.Array, hook, attention_mask) -> jax.Array:
        x = hook("hook_resid_pre", x)
        attn = self.self_attn(self.input_layernorm(x, hook, "ln1.hook_scale"), attention_mask, hook)
        attn = self.post_attention_layernorm(attn, hook, "ln1_post.hook_scale")
        x = hook("hook_resid_mid", x + hook("hook_attn_out", attn))
        out = self.mlp(hook("ln2.hook_normalized", self.pre_feedforward_layernorm(x, hook, "ln2.hook_scale")), hook)
        out = self.post_feedforward_layernorm(out, hook, "ln2_post.hook_scale")
        return hook("hook_resid_post", x + hook("hook_mlp_out", out))


class Gemma2(Llama):
    """tokens [batch, seq] -> logits [batch, seq, vocab_size]."""

    block = Block
    norm_offset = 1.0

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = super().embed(tokens)
        return x * jnp.asarray(self.config.d_model**0.5, x.dtype)

    def unembed(self, x: jax.Array, hooks: Hooks) -> jax.Array:
        logits, cap = super().unembed(x, hooks), self.config.final_logit_softcapping
        return logits if cap is None else cap * jnp.tanh(logits / cap)


FAMILIES.register("gemma2", Family(Gemma2Config.from_hf, Gemma2, prefixes=("model.", "")))
