"""Llama (Touvron et al. 2023; transformers' `llama`), which also reads Mistral (Jiang et al. 2023;
`mistral`) and Qwen2 (Yang et al. 2024; `qwen2`): the same block, differing in biases and sliding windows.

Pre-RMSNorm blocks, rotary positions on q and k (Su et al. 2021; rope_parameters / rope_scaling: 'linear',
'llama3'), grouped-query attention (num_key_value_heads kv heads, each read by heads / kv_heads query
heads; head_dim may differ from d_model / heads), a SwiGLU MLP (Shazeer 2020). Block l, on the residual
stream x: [batch, seq, d_model], with d_head = head_dim, H heads, G kv heads:

    q, k, v    = RoPE(N₁(x) W_q), RoPE(N₁(x) W_k), N₁(x) W_v    W_q: [d, H·d_head], W_k, W_v: [d, G·d_head]
    attn_out   = Attn(q, k, v) W_o                             W_o: [H·d_head, d]; causal, scale d_head^−½
    resid_mid  = x + attn_out
    ln2.hook_normalized = N₂(resid_mid)                        N₂: post_attention_layernorm
    mlp.hook_pre  = N₂(resid_mid) W_gate                       W_gate, W_up: [d, d_mlp]
    mlp.hook_post = act(mlp.hook_pre) · N₂(resid_mid) W_up     act: hidden_act (silu)
    mlp_out    = mlp.hook_post W_down                          W_down: [d_mlp, d]
    resid_post = resid_mid + mlp_out

N(x) = x / √(mean(x²) + rms_norm_eps) · γ. logits = N_f(x) W_U, W_U the embedding (tie_word_embeddings)
or lm_head. Biases: Llama's attention_bias (q, k, v, o) and mlp_bias; Qwen2's on q, k, v. Sliding windows
(a query sees its last sliding_window positions): Mistral's on every layer; Qwen2's on the layers
layer_types marks 'sliding_attention' (use_sliding_window, from max_window_layers on). gemma2.py reuses
the attention, the MLP and the model here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sae.models.base import FAMILIES, Family, Hooks, Model, ModelConfig, ModelError, first_id
from sae.models.layers import Linear, RMSNorm, activation, apply_rope, attention, rope_frequencies

# config.json's bias switches: (q, k, v), o, MLP
BIASES = {
    "llama": lambda c: (c.get("attention_bias", False), c.get("attention_bias", False), c.get("mlp_bias", False)),
    "mistral": lambda c: (False, False, False),
    "qwen2": lambda c: (True, False, False),
}


def layer_windows(c: dict, default: list[str]) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: it sees every earlier position): sliding_window on the layers that
    config.json's layer_types (else `default`) marks 'sliding_attention'."""
    kinds = c.get("layer_types") or default
    if len(kinds) != len(default) or not set(kinds) <= {"sliding_attention", "full_attention"}:
        raise ModelError(
            f"config.json: layer_types={kinds!r} must give 'sliding_attention' or 'full_attention' for each of "
            f"the {len(default)} layers"
        )
    return tuple(c.get("sliding_window") if kind == "sliding_attention" else None for kind in kinds)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    n_kv_heads: int = 0
    head_dim: int | None = None  # None: d_model / n_heads
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    inv_freq: tuple[float, ...] = ()  # rotary inverse frequencies, d_head / 2 of them (layers.rope_frequencies)
    windows: tuple[int | None, ...] = ()  # per layer (layer_windows)

    @property
    def d_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @classmethod
    def fields_from_hf(cls, c: dict, model_type: str, act_field: str = "hidden_act", act: str = "silu") -> dict:
        """The LlamaConfig fields of config.json `c` (gemma2.py adds its own)."""
        n_heads = c["num_attention_heads"]
        n_kv = c.get("num_key_value_heads") or n_heads
        if n_heads % n_kv:
            raise ModelError(f"config.json: num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
        for where in (c, c.get("rope_parameters") or {}, c.get("rope_scaling") or {}):
            if (factor := where.get("partial_rotary_factor", 1.0)) != 1.0:
                raise ModelError(f"config.json: partial_rotary_factor={factor} is not supported for {model_type}")
        head_dim = c.get("head_dim") or c["hidden_size"] // n_heads
        activation(c.get(act_field, act), act_field)
        return dict(
            model_type=model_type,
            n_layers=c["num_hidden_layers"],
            d_model=c["hidden_size"],
            n_heads=n_heads,
            d_mlp=c["intermediate_size"],
            vocab_size=c["vocab_size"],
            n_ctx=c["max_position_embeddings"],
            bos_token_id=first_id(c.get("bos_token_id")),
            eos_token_id=first_id(c.get("eos_token_id")),
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            hidden_act=c.get(act_field, act),
            inv_freq=tuple(float(f) for f in jax.device_get(rope_frequencies(c, head_dim))),
        )

    @classmethod
    def from_hf(cls, c: dict) -> LlamaConfig:
        model_type, n = c["model_type"], c["num_hidden_layers"]
        qkv, o, mlp = BIASES[model_type](c)
        windows: tuple[int | None, ...] = (None,) * n
        if model_type == "mistral":  # every layer (transformers' Mistral ignores layer_types)
            windows = (c.get("sliding_window"),) * n
        elif model_type == "qwen2" and c.get("use_sliding_window"):  # from max_window_layers on, by default
            mwl = c.get("max_window_layers", 28)
            windows = layer_windows(c, ["sliding_attention" if i >= mwl else "full_attention" for i in range(n)])
        return cls(
            **cls.fields_from_hf(c, model_type),
            windows=windows,
            qkv_bias=bool(qkv),
            o_bias=bool(o),
            mlp_bias=bool(mlp),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


class Attention(nnx.Module):
    """Rotary grouped-query self-attention: h -> Attn(RoPE(h W_q), RoPE(h W_k), h W_v) W_o, [batch, seq, d_model].
    scale: the scores' (default d_head^−½); softcap, window: as `layers.attention`."""

    def __init__(self, w, name: str, c: LlamaConfig, window: int | None, scale: float | None = None, softcap=None):
        d, e = c.d_model, c.d_head
        self.n_heads, self.n_kv_heads, self.d_head = c.n_heads, c.n_kv_heads, e
        self.window, self.softcap, self.inv_freq = window, softcap, c.inv_freq
        self.scale = e**-0.5 if scale is None else scale
        self.q_proj = Linear(w, f"{name}.q_proj", d, c.n_heads * e, bias=c.qkv_bias)
        self.k_proj = Linear(w, f"{name}.k_proj", d, c.n_kv_heads * e, bias=c.qkv_bias)
        self.v_proj = Linear(w, f"{name}.v_proj", d, c.n_kv_heads * e, bias=c.qkv_bias)
        self.o_proj = Linear(w, f"{name}.o_proj", c.n_heads * e, d, bias=c.o_bias)

    def __call__(self, x: jax.Array, attention_mask, hook=None) -> jax.Array:
        b, s, _ = x.shape
        inv = jnp.asarray(self.inv_freq, jnp.float32)
        q = apply_rope(self.q_proj(x).reshape(b, s, self.n_heads, self.d_head), inv)
        k = apply_rope(self.k_proj(x).reshape(b, s, self.n_kv_heads, self.d_head), inv)
        v = self.v_proj(x).reshape(b, s, self.n_kv_heads, self.d_head)
        z = attention(
            q,
            k,
            v,
            causal=True,
            scale=self.scale,
            window=self.window,
            softcap=self.softcap,
            attention_mask=attention_mask,
            hook=hook,
        )
        return self.o_proj(z)


class GatedMLP(nnx.Module):
    """act(x W_gate) · (x W_up) W_down, calling the hook at mlp.hook_pre and mlp.hook_post."""

    def __init__(self, w, name: str, c: LlamaConfig, bias: bool = False, act_field: str = "hidden_act"):
        self.act = activation(c.hidden_act, act_field)
        self.gate_proj = Linear(w, f"{name}.gate_proj", c.d_model, c.d_mlp, bias=bias)
        self.up_proj = Linear(w, f"{name}.up_proj", c.d_model, c.d_mlp, bias=bias)
        self.down_proj = Linear(w, f"{name}.down_proj", c.d_mlp, c.d_model, bias=bias)

    def __call__(self, x: jax.Array, hook) -> jax.Array:
        pre = hook("mlp.hook_pre", self.gate_proj(x))
        return self.down_proj(hook("mlp.hook_post", self.act(pre) * self.up_proj(x)))


class Block(nnx.Module):
    def __init__(self, w, name: str, c: LlamaConfig, layer: int):
        self.input_layernorm = RMSNorm(w, f"{name}.input_layernorm", c.d_model, c.rms_norm_eps)
        self.self_attn = Attention(w, f"{name}.self_attn", c, c.windows[layer])
        self.post_attention_layernorm = RMSNorm(w, f"{name}.post_attention_layernorm", c.d_model, c.rms_norm_eps)
        self.mlp = GatedMLP(w, f"{name}.mlp", c, c.mlp_bias)

    def __call__(self, x: jax.Array, hook, attention_mask) -> jax.Array:
        x = hook("hook_resid_pre", x)
        attn = self.self_attn(self.input_layernorm(x, hook, "ln1.hook_scale"), attention_mask, hook)
        x = hook("hook_resid_mid", x + hook("hook_attn_out", attn))
        out = self.mlp(hook("ln2.hook_normalized", self.post_attention_layernorm(x, hook, "ln2.hook_scale")), hook)
        return hook("hook_resid_post", x + hook("hook_mlp_out", out))


class Llama(Model):
    """tokens [batch, seq] -> logits [batch, seq, vocab_size]. Subclasses (gemma2) change the block, the
    final norm's offset, `embed` and `unembed`."""

    block = Block
    norm_offset = 0.0

    def __init__(self, c: LlamaConfig, w):
        self.config = c
        self.embed_tokens = nnx.Param(w("embed_tokens.weight", (c.vocab_size, c.d_model)))
        self.layers = nnx.List([type(self).block(w, f"layers.{i}", c, i) for i in range(c.n_layers)])
        self.norm = RMSNorm(w, "norm", c.d_model, c.rms_norm_eps, self.norm_offset)
        # lm_head.weight sits outside the "model." prefix, so it is asked for under its full name.
        self.lm_head = (
            None if c.tie_word_embeddings else nnx.Param(w.unprefixed("lm_head.weight", (c.vocab_size, c.d_model)))
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens[...][tokens]

    def unembed(self, x: jax.Array, hooks: Hooks) -> jax.Array:
        """The logits (hook_logits: before any soft-cap)."""
        logits = (
            self.norm(x, hooks, "ln_final.hook_scale")
            @ (self.embed_tokens if self.lm_head is None else self.lm_head)[...].T
        )
        return hooks("hook_logits", logits)

    def forward(self, tokens: jax.Array, hooks: Hooks, attention_mask) -> jax.Array:
        x = self.embed(tokens)
        for i, block in enumerate(self.layers):
            x = block(x, hooks.at(i), attention_mask)
        return self.unembed(x, hooks)


for _name in BIASES:
    FAMILIES.register(_name, Family(LlamaConfig.from_hf, Llama, prefixes=("model.", "")))
