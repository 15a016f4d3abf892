"""SAELens's inference rules, written once: every family encodes by one of them, and so do the exported
SAE (`sae.export.LoadedSAE`) and the feature browser's per-latent values (`sae.inspect.examples`).

With u W_enc the projection of the input (u = x − b_dec when the SAE applies b_dec to its input, else x)
and the per-latent tensors below ([d_sae] each):

  "standard"  b_enc                     f = ReLU(u W_enc + b_enc)
  "topk"      b_enc                     f = ReLU(TopK_k(u W_enc + b_enc))
  "jumprelu"  b_enc, threshold          f = ReLU(pre) · 1[pre > threshold],  pre = u W_enc + b_enc
  "gated"     b_gate, r_mag, b_mag      f = 1[u W_enc + b_gate > 0] · ReLU(exp(r_mag) ⊙ (u W_enc) + b_mag)

The SAE's tensors are W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in] and these (SAELens's names;
its load_state_dict is strict). The pre-bias is applied as x W_enc − b_dec W_enc: the same value, and b_dec's
gradient through it is a vector–matrix product, not a [batch, d_in] one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae.architectures.sparse import scatter_dense, top_k_of

LATENT_TENSORS: dict[str, tuple[str, ...]] = {
    "standard": ("b_enc",),
    "topk": ("b_enc",),
    "jumprelu": ("b_enc", "threshold"),
    "gated": ("b_gate", "r_mag", "b_mag"),
}


# A transcoder exports as SAELens's transcoder of its encoder's rule, with W_skip [d_out, d_in] when it has
# one. SAELens (6.x) has no TopK transcoder: "topk_transcoder" is ours (our loader reads it).
TRANSCODERS: dict[tuple[str, bool], str] = {
    ("standard", False): "transcoder",
    ("standard", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
    ("topk", False): "topk_transcoder",
    ("topk", True): "topk_skip_transcoder",
}
ENCODER_RULE = {name: rule for (rule, _), name in TRANSCODERS.items()}  # transcoder architecture -> rule


def tensor_shapes(arch: str, d_in: int, d_sae: int, d_out: int | None = None, skip: bool = False) -> dict:
    """Every tensor of an SAELens SAE of this architecture with its shape (a transcoder: d_out, W_skip)."""
    d_out = d_in if d_out is None else d_out
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if skip:
        shapes["W_skip"] = (d_out, d_in)
    return {**shapes, **{name: (d_sae,) for name in LATENT_TENSORS[arch]}}


def activate(arch: str, s: jax.Array, latent: dict[str, jax.Array], floor: jax.Array | None = None) -> jax.Array:
    """Activations from projections s = u·W_enc[:, i] ([..., n]) and the per-latent tensors of those
    latents (`latent`: each broadcastable to s). TopK needs `floor`, the row's k-th largest pre-activation
    (the latent is active iff it reaches it); `encode` takes the top-k itself."""
    if arch == "gated":
        return jnp.where(s + latent["b_gate"] > 0, jax.nn.relu(jnp.exp(latent["r_mag"]) * s + latent["b_mag"]), 0.0)
    pre = s + latent["b_enc"]
    if arch == "jumprelu":
        return jnp.where(pre > latent["threshold"], jax.nn.relu(pre), 0.0)
    if arch == "topk":  # 1e-5 relative slack: a floor from a batched matmul, s from a dot product
        return jnp.where(pre >= floor * (1 - 1e-5), jax.nn.relu(pre), 0.0)
    return jax.nn.relu(pre)


def encode(arch: str, params: dict[str, jax.Array], x: jax.Array, pre_bias: bool, k: int = 0) -> jax.Array:
    """x: [batch, d_in] -> f: [batch, d_sae] by the architecture's rule (k: TopK's k)."""
    if arch == "topk":
        vals, idx = topk_code(params, x, pre_bias, k)
        return scatter_dense(vals, idx, params["W_enc"].shape[-1])
    xw = x @ params["W_enc"]
    b_dec_w = params["b_dec"] @ params["W_enc"] if pre_bias else 0.0
    if arch == "gated":
        return activate(arch, xw - b_dec_w, params)
    return activate(arch, xw, {**params, "b_enc": params["b_enc"] - b_dec_w})  # the pre-bias folded into b_enc


def topk_code(params: dict[str, jax.Array], x: jax.Array, pre_bias: bool, k: int) -> tuple[jax.Array, jax.Array]:
    """The TopK rule's code without its zeros: x [batch, d_in] -> (values descending, latent indices)
    [batch, k], by the CPU top-k kernel where it runs (one read of x W_enc)."""
    b_dec_w = params["b_dec"] @ params["W_enc"] if pre_bias else 0.0
    return top_k_of(x @ params["W_enc"], params["b_enc"] - b_dec_w, k)
