"""BERT (Devlin et al. 2019; transformers' `bert`): the encoder of sentence-transformers' all-MiniLM-L6-v2.

Post-LayerNorm blocks, learned positions, bidirectional attention (attention_mask hides padding keys); the
model gives the last hidden state [batch, seq, d_model] (no pooler, no MLM head). The stream entering
block 0 is LN_emb(word + position + token_type₀). Block l, on x: [batch, seq, d_model]:

    attn_out   = Attn(x)                         attention.self.{query,key,value}: [d, d] each,
                                                 attention.output.dense: [d, d] (before the add + LN)
    resid_mid  = LN₁(x + attn_out)               attention.output.LayerNorm
    ln2.hook_normalized = resid_mid              the MLP's input (BERT has no pre-MLP norm)
    mlp.hook_pre  = resid_mid W_in + b_in        intermediate.dense: [d, d_mlp]
    mlp.hook_post = gelu(mlp.hook_pre)           hidden_act (exact gelu)
    mlp_out    = mlp.hook_post W_out + b_out     output.dense: [d_mlp, d] (before the add + LN)
    resid_post = LN₂(resid_mid + mlp_out)        output.LayerNorm: the block's output

A replace at ln2.hook_normalized changes the MLP's input only; the residual LN₂ adds to is resid_mid.
`mean_pooled` turns the hidden states into all-MiniLM-L6-v2's sentence embeddings.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sae.models.base import FAMILIES, Family, Hooks, Model, ModelConfig, ModelError, first_id
from sae.models.layers import LayerNorm, Linear, activation, attention


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelConfig):
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    type_vocab_size: int = 2

    @classmethod
    def from_hf(cls, c: dict) -> BertConfig:
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(
                f"config.json: position_embedding_type={c['position_embedding_type']!r} is not supported for "
                "bert (only 'absolute')"
            )
        for key in ("is_decoder", "add_cross_attention"):
            if c.get(key):
                raise ModelError(f"config.json: {key}=true is not supported for bert (an encoder)")
        return cls(
            model_type="bert",
            n_layers=c["num_hidden_layers"],
            d_model=c["hidden_size"],
            n_heads=c["num_attention_heads"],
            d_mlp=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            n_ctx=c["max_position_embeddings"],
            causal=False,
            bos_token_id=first_id(c.get("bos_token_id")),
            eos_token_id=first_id(c.get("eos_token_id")),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            hidden_act=c.get("hidden_act", "gelu"),
            type_vocab_size=c.get("type_vocab_size", 2),
        )


class Block(nnx.Module):
    def __init__(self, w, name: str, c: BertConfig):
        d, eps = c.d_model, c.layer_norm_eps
        self.n_heads, self.act = c.n_heads, activation(c.hidden_act)
        self.query = Linear(w, f"{name}.attention.self.query", d, d)
        self.key = Linear(w, f"{name}.attention.self.key", d, d)
        self.value = Linear(w, f"{name}.attention.self.value", d, d)
        self.attn_dense = Linear(w, f"{name}.attention.output.dense", d, d)
        self.attn_norm = LayerNorm(w, f"{name}.attention.output.LayerNorm", d, eps)
        self.intermediate = Linear(w, f"{name}.intermediate.dense", d, c.d_mlp)
        self.output = Linear(w, f"{name}.output.dense", c.d_mlp, d)
        self.output_norm = LayerNorm(w, f"{name}.output.LayerNorm", d, eps)

    def __call__(self, x: jax.Array, hook, attention_mask) -> jax.Array:
        b, s, d = x.shape
        heads = lambda y: y.reshape(b, s, self.n_heads, d // self.n_heads)
        x = hook("hook_resid_pre", x)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        z = attention(q, k, v, causal=False, scale=(d // self.n_heads) ** -0.5, attention_mask=attention_mask)
        x = hook("hook_resid_mid", self.attn_norm(x + hook("hook_attn_out", self.attn_dense(z))))
        pre = hook("mlp.hook_pre", self.intermediate(hook("ln2.hook_normalized", x)))
        out = hook("hook_mlp_out", self.output(hook("mlp.hook_post", self.act(pre))))
        return hook("hook_resid_post", self.output_norm(x + out))


class Bert(Model):
    """tokens [batch, seq] (attention_mask [batch, seq], 1 = a real token) -> hidden [batch, seq, d_model]."""

    def __init__(self, c: BertConfig, w):
        self.config = c
        d = c.d_model
        self.word_embeddings = nnx.Param(w("embeddings.word_embeddings.weight", (c.vocab_size, d)))
        self.position_embeddings = nnx.Param(w("embeddings.position_embeddings.weight", (c.n_ctx, d)))
        self.token_type_embeddings = nnx.Param(w("embeddings.token_type_embeddings.weight", (c.type_vocab_size, d)))
        self.embed_norm = LayerNorm(w, "embeddings.LayerNorm", d, c.layer_norm_eps)
        self.layer = nnx.List([Block(w, f"encoder.layer.{i}", c) for i in range(c.n_layers)])

    def forward(self, tokens: jax.Array, hooks: Hooks, attention_mask) -> jax.Array:
        # transformers' order: (word + token_type) + position; every token is type 0 (one segment).
        x = self.word_embeddings[...][tokens] + self.token_type_embeddings[...][0]
        x = self.embed_norm(x + self.position_embeddings[...][: tokens.shape[1]])
        for i, block in enumerate(self.layer):
            x = block(x, hooks.at(i), attention_mask)
        return x


def mean_pooled(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sentence embeddings [batch, d] from hidden [batch, seq, d]: the mean over the real tokens
    (attention_mask [batch, seq], 1 = real), then unit L2 norm: sentence-transformers' Pooling
    (pooling_mode_mean_tokens) and Normalize, as all-MiniLM-L6-v2 applies them."""
    mask = jnp.asarray(attention_mask, jnp.float32)[..., None]
    total = (hidden.astype(jnp.float32) * mask).sum(1)
    mean = total / jnp.maximum(mask.sum(1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


FAMILIES.register("bert", Family(BertConfig.from_hf, Bert, prefixes=("bert.", "")))
