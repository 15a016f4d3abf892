"""The pieces the families share: linear maps, LayerNorm and RMSNorm, rotary embeddings, attention.

Weights come from a `Weights` (or `RandomWeights`) by their Hugging Face names. torch's `nn.Linear`
stores W as [out, in]; GPT-2's `Conv1D` stores [in, out]; here every kernel is [in, out], y = x W + b.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sae.models.base import ModelError

ACTIVATIONS = {  # transformers' ACT2FN names
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str, field: str = "hidden_act"):
    if name not in ACTIVATIONS:
        raise ModelError(f"config.json: {field}={name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Linear(nnx.Module):
    """y = x W + b; W: [d_in, d_out] (read transposed from torch's [d_out, d_in] unless `conv1d`)."""

    def __init__(self, weights, name: str, d_in: int, d_out: int, bias: bool = True, conv1d: bool = False):
        if conv1d:
            self.kernel = nnx.Param(weights(f"{name}.weight", (d_in, d_out)))
        else:
            self.kernel = nnx.Param(weights(f"{name}.weight", (d_out, d_in)).T)
        self.bias = nnx.Param(weights(f"{name}.bias", (d_out,), "zeros")) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class LayerNorm(nnx.Module):
    """(x − mean) / √(var + eps) · γ + β over the last axis (statistics in float32). Called with a hook and a
    site name, the hook sees (and may replace) the scale 1 / √(var + eps): [..., 1]."""

    def __init__(self, weights, name: str, d: int, eps: float, bias: bool = True):
        self.eps = eps
        self.scale = nnx.Param(weights(f"{name}.weight", (d,), "ones"))
        self.bias = nnx.Param(weights(f"{name}.bias", (d,), "zeros")) if bias else None

    def __call__(self, x: jax.Array, hook=None, site: str = "") -> jax.Array:
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        y = ((h - mean) * _scale(jax.lax.rsqrt(var + self.eps), hook, site)).astype(x.dtype) * self.scale[...]
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    """x / √(mean(x²) + eps) · (offset + γ): offset 0 for Llama, 1 for Gemma (which stores γ − 1).
    As transformers: Llama casts the normalised x back to x's dtype before scaling, Gemma scales in float32.
    A hook, as LayerNorm's, sees the scale 1 / √(mean(x²) + eps)."""

    def __init__(self, weights, name: str, d: int, eps: float, offset: float = 0.0):
        self.eps, self.offset = eps, offset
        self.scale = nnx.Param(weights(f"{name}.weight", (d,), "zeros" if offset else "ones"))

    def __call__(self, x: jax.Array, hook=None, site: str = "") -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * _scale(jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + self.eps), hook, site)
        if not self.offset:
            return h.astype(x.dtype) * self.scale[...]
        return (h * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def _scale(scale: jax.Array, hook, site: str) -> jax.Array:
    """A norm's scale as its hook leaves it (the circuits' local replacement model freezes it)."""
    return scale if hook is None else hook(site, scale)


def rope_frequencies(config: dict, d_rot: int) -> jax.Array:
    """Rotary inverse frequencies θ^(−2i/d_rot), i < d_rot/2 (Su et al. 2021), with config.json's scaling:
    'linear' divides them by the factor; 'llama3' (Llama 3.1) divides the low-frequency band by the factor,
    keeps the high one and interpolates between (transformers' `_compute_llama3_parameters`)."""
    params = dict(config.get("rope_parameters") or {})  # transformers 5 writes this (rope_theta inside)
    scaling = dict(config.get("rope_scaling") or {})  # older config.json files: rope_scaling + rope_theta
    theta = float(params.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base", 10000.0))))
    where = (
        ("rope_parameters", params, "rope_type"),
        ("rope_scaling", scaling, "rope_type"),
        ("rope_scaling", scaling, "type"),
    )
    kind, field = next(((d[k], f"{name}.{k}") for name, d, k in where if d.get(k)), ("default", "rope_type"))
    scaling = {**scaling, **params}
    inv = 1.0 / theta ** (jnp.arange(0, d_rot, 2, dtype=jnp.float32) / d_rot)
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return jnp.where(medium, smoothed, scaled)
    raise ModelError(f"config.json: {field}={kind!r} is not one of ['default', 'linear', 'llama3']")


def apply_rope(x: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate the first 2·len(inv_freq) features of each head by position (halves paired, as transformers'
    rotate_half); x: [batch, seq, heads, d_head]. The rest of each head passes unchanged (partial rotary)."""
    d_rot = 2 * inv_freq.shape[0]
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv_freq[None]  # [seq, d_rot / 2]
    cos, sin = (jnp.concatenate([f(angles)] * 2, -1)[None, :, None] for f in (jnp.cos, jnp.sin))
    rot, rest = x[..., :d_rot].astype(jnp.float32), x[..., d_rot:]
    half = d_rot // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
    return jnp.concatenate([(rot * cos + rotated * sin).astype(x.dtype), rest], -1)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    attention_mask: jax.Array | None = None,
    hook=None,
) -> jax.Array:
    """softmax(q kᵀ · scale + mask) v with grouped-query heads; q: [batch, seq, heads, d_head], k, v:
    [batch, seq, kv_heads, d_head] (query head i reads kv head i // (heads / kv_heads)). softcap: scores
    become cap · tanh(scores / cap) (Gemma 2). window: a query sees only the last `window` positions (itself
    included). attention_mask [batch, seq]: 0 hides that key. hook: called at attn.hook_pattern with the
    probabilities [batch, heads, query, key] (float32). Returns [batch, seq, heads · d_head]."""
    b, s, h, e = q.shape
    g = k.shape[2]
    q = q.reshape(b, s, g, h // g, e)
    scores = jnp.einsum("bqgre,bkge->bgrqk", q, k).astype(jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    query, key = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
    mask = jnp.ones((s, s), bool)
    if causal:
        mask &= key <= query
    if window is not None:
        mask &= query - key < window
    mask = jnp.broadcast_to(mask, (b, 1, 1, s, s))
    if attention_mask is not None:
        mask &= attention_mask.astype(bool)[:, None, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    if hook is not None:
        probs = hook("attn.hook_pattern", probs.reshape(b, h, s, s)).reshape(b, g, h // g, s, s)
    probs = probs.astype(v.dtype)
    return jnp.einsum("bgrqk,bkge->bqgre", probs, v).reshape(b, s, h * e)
