"""GPT-NeoX (Black et al. 2022; transformers' `gpt_neox`): Pythia (Biderman et al. 2023).

Pre-LayerNorm blocks (with bias), rotary positions on the first d_rot = d_head · rotary_pct features of
each query and key head (Pythia: 0.25), an untied unembedding `embed_out`. Block l, on the residual
stream x: [batch, seq, d_model]:

    q, k, v    = LN₁(x) W_qkv + b_qkv          query_key_value: [d, 3d], per head [heads, 3, d_head]
    attn_out   = Attn(rope(q), rope(k), v) W_O + b_O     dense: [d, d]
    resid_mid  = x + attn_out
    ln2.hook_normalized = LN₂(x)          with use_parallel_residual (Pythia): the MLP reads the block input
                        = LN₂(resid_mid)  without it: the GPT-2 layout
    mlp.hook_pre  = ln2.hook_normalized W_in + b_in     dense_h_to_4h: [d, d_mlp]
    mlp.hook_post = gelu(mlp.hook_pre)                  hidden_act (exact gelu)
    mlp_out    = mlp.hook_post W_out + b_out            dense_4h_to_h: [d_mlp, d]
    resid_post = resid_mid + mlp_out

With the parallel residual, resid_mid is x + attn_out all the same, but the MLP does not read it (a replace
there reaches resid_post only); transformers sums x + attn_out + mlp_out in one step. logits =
LN_f(x) W_U, W_U = embed_out (outside the "gpt_neox." prefix; embed_in when tie_word_embeddings).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sae.models.base import FAMILIES, Family, Hooks, Model, ModelConfig, first_id
from sae.models.layers import LayerNorm, Linear, activation, apply_rope, attention, rope_frequencies


def rotary_pct(c: dict) -> float:
    """The rotated fraction of each head: transformers 5 writes rope_parameters.partial_rotary_factor,
    older configs (Pythia's) rotary_pct; transformers' default is 0.25."""
    for params in (c.get("rope_parameters"), c.get("rope_scaling")):
        if isinstance(params, dict) and "partial_rotary_factor" in params:
            return float(params["partial_rotary_factor"])
    return float(c.get("rotary_pct", 0.25))


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(ModelConfig):
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    inv_freq: tuple[float, ...] = ()  # rotary inverse frequencies, d_rot / 2 of them (layers.rope_frequencies)

    @classmethod
    def from_hf(cls, c: dict) -> GPTNeoXConfig:
        d, heads = c["hidden_size"], c["num_attention_heads"]
        d_rot = int(d // heads * rotary_pct(c))
        return cls(
            model_type="gpt_neox",
            n_layers=c["num_hidden_layers"],
            d_model=d,
            n_heads=heads,
            d_mlp=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            n_ctx=c["max_position_embeddings"],
            bos_token_id=first_id(c.get("bos_token_id")),
            eos_token_id=first_id(c.get("eos_token_id")),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5),
            hidden_act=c.get("hidden_act", "gelu"),
            use_parallel_residual=c.get("use_parallel_residual", True),
            attention_bias=c.get("attention_bias", True),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            inv_freq=tuple(float(f) for f in jax.device_get(rope_frequencies(c, d_rot))),
        )


class Block(nnx.Module):
    def __init__(self, w, name: str, c: GPTNeoXConfig):
        d, eps, bias = c.d_model, c.layer_norm_eps, c.attention_bias
        self.n_heads, self.parallel, self.inv_freq = c.n_heads, c.use_parallel_residual, c.inv_freq
        self.act = activation(c.hidden_act)
        self.input_layernorm = LayerNorm(w, f"{name}.input_layernorm", d, eps)
        self.query_key_value = Linear(w, f"{name}.attention.query_key_value", d, 3 * d, bias=bias)
        self.dense = Linear(w, f"{name}.attention.dense", d, d, bias=bias)
        self.post_attention_layernorm = LayerNorm(w, f"{name}.post_attention_layernorm", d, eps)
        self.dense_h_to_4h = Linear(w, f"{name}.mlp.dense_h_to_4h", d, c.d_mlp)
        self.dense_4h_to_h = Linear(w, f"{name}.mlp.dense_4h_to_h", c.d_mlp, d)

    def __call__(self, x: jax.Array, hook, attention_mask) -> jax.Array:
        b, s, d = x.shape
        e = d // self.n_heads
        x = hook("hook_resid_pre", x)
        # transformers views the fused output as [batch, seq, heads, 3·d_head] and chunks q, k, v per head.
        qkv = self.query_key_value(self.input_layernorm(x, hook, "ln1.hook_scale")).reshape(b, s, self.n_heads, 3, e)
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q, k, v = apply_rope(qkv[:, :, :, 0], inv_freq), apply_rope(qkv[:, :, :, 1], inv_freq), qkv[:, :, :, 2]
        z = attention(q, k, v, causal=True, scale=e**-0.5, attention_mask=attention_mask, hook=hook)
        attn_out = hook("hook_attn_out", self.dense(z))
        mid = hook("hook_resid_mid", x + attn_out)
        normalized = hook(
            "ln2.hook_normalized", self.post_attention_layernorm(x if self.parallel else mid, hook, "ln2.hook_scale")
        )
        pre = hook("mlp.hook_pre", self.dense_h_to_4h(normalized))
        out = hook("hook_mlp_out", self.dense_4h_to_h(hook("mlp.hook_post", self.act(pre))))
        return hook("hook_resid_post", mid + out)


class GPTNeoX(Model):
    """tokens [batch, seq] -> logits [batch, seq, vocab_size]."""

    def __init__(self, c: GPTNeoXConfig, w):
        self.config = c
        self.embed_in = nnx.Param(w("embed_in.weight", (c.vocab_size, c.d_model)))
        self.layers = nnx.List([Block(w, f"layers.{i}", c) for i in range(c.n_layers)])
        self.final_layer_norm = LayerNorm(w, "final_layer_norm", c.d_model, c.layer_norm_eps)
        # embed_out.weight sits outside the "gpt_neox." prefix, so it is asked for under its full name.
        self.embed_out = (
            None if c.tie_word_embeddings else nnx.Param(w.unprefixed("embed_out.weight", (c.vocab_size, c.d_model)))
        )

    def forward(self, tokens: jax.Array, hooks: Hooks, attention_mask) -> jax.Array:
        x = self.embed_in[...][tokens]
        for i, block in enumerate(self.layers):
            x = block(x, hooks.at(i), attention_mask)
        unembed = self.embed_in if self.embed_out is None else self.embed_out
        return hooks("hook_logits", self.final_layer_norm(x, hooks, "ln_final.hook_scale") @ unembed[...].T)


FAMILIES.register("gpt_neox", Family(GPTNeoXConfig.from_hf, GPTNeoX, prefixes=("gpt_neox.", "")))
