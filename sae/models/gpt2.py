"""GPT-2 (Radford et al. 2019; transformers' `gpt2`), also the in-house LM's layout (lm-train).

Pre-LayerNorm blocks, learned positions, a tied (or, with tie_word_embeddings: false, separate)
unembedding. Block l, on the residual stream x: [batch, seq, d_model]:

    attn_out   = Attn(LN₁(x))                  c_attn: [d, 3d] (q, k, v), c_proj: [d, d]
    resid_mid  = x + attn_out
    mlp.hook_pre  = LN₂(resid_mid) W_fc + b_fc  (ln2.hook_normalized is LN₂(resid_mid))
    mlp.hook_post = act(mlp.hook_pre)           act: config's activation_function (gelu_new; relu for ours)
    mlp_out    = mlp.hook_post W_proj + b_proj
    resid_post = resid_mid + mlp_out

logits = LN_f(x) W_U. `to_hf` writes the model back as a transformers `gpt2` directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from sae.models.base import FAMILIES, Family, Hooks, Model, ModelConfig, ModelError, first_id
from sae.models.layers import LayerNorm, Linear, activation, attention


@dataclasses.dataclass(frozen=True)
class GPT2Config(ModelConfig):
    layer_norm_eps: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, c: dict) -> GPT2Config:
        for key in ("scale_attn_by_inverse_layer_idx",):
            if c.get(key):
                raise ModelError(f"config.json: {key}=true is not supported for gpt2")
        if c.get("scale_attn_weights", True) is False:
            raise ModelError("config.json: scale_attn_weights=false is not supported for gpt2")
        d = c["n_embd"]
        return cls(
            model_type="gpt2",
            n_layers=c["n_layer"],
            d_model=d,
            n_heads=c["n_head"],
            d_mlp=c.get("n_inner") or 4 * d,
            vocab_size=c["vocab_size"],
            n_ctx=c["n_positions"],
            bos_token_id=first_id(c.get("bos_token_id")),
            eos_token_id=first_id(c.get("eos_token_id")),
            layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
            activation_function=c.get("activation_function", "gelu_new"),
            tie_word_embeddings=c.get("tie_word_embeddings", True),
        )

    def to_hf(self) -> dict:
        """config.json for transformers' GPT2LMHeadModel."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": self.n_layers,
            "n_embd": self.d_model,
            "n_head": self.n_heads,
            "n_inner": self.d_mlp,
            "vocab_size": self.vocab_size,
            "n_positions": self.n_ctx,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "layer_norm_epsilon": self.layer_norm_eps,
            "activation_function": self.activation_function,
            "tie_word_embeddings": self.tie_word_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "torch_dtype": "float32",
        }


class Block(nnx.Module):
    def __init__(self, w, name: str, c: GPT2Config):
        d, eps = c.d_model, c.layer_norm_eps
        self.n_heads, self.act = c.n_heads, activation(c.activation_function, "activation_function")
        self.ln_1 = LayerNorm(w, f"{name}.ln_1", d, eps)
        self.c_attn = Linear(w, f"{name}.attn.c_attn", d, 3 * d, conv1d=True)
        self.c_proj = Linear(w, f"{name}.attn.c_proj", d, d, conv1d=True)
        self.ln_2 = LayerNorm(w, f"{name}.ln_2", d, eps)
        self.c_fc = Linear(w, f"{name}.mlp.c_fc", d, c.d_mlp, conv1d=True)
        self.mlp_proj = Linear(w, f"{name}.mlp.c_proj", c.d_mlp, d, conv1d=True)

    def __call__(self, x: jax.Array, hook, attention_mask) -> jax.Array:
        b, s, d = x.shape
        x = hook("hook_resid_pre", x)
        qkv = self.c_attn(self.ln_1(x, hook, "ln1.hook_scale")).reshape(b, s, 3 * self.n_heads, d // self.n_heads)
        q, k, v = jnp.split(qkv, 3, 2)
        z = attention(q, k, v, causal=True, scale=(d // self.n_heads) ** -0.5, attention_mask=attention_mask, hook=hook)
        x = hook("hook_resid_mid", x + hook("hook_attn_out", self.c_proj(z)))
        pre = hook("mlp.hook_pre", self.c_fc(hook("ln2.hook_normalized", self.ln_2(x, hook, "ln2.hook_scale"))))
        out = hook("hook_mlp_out", self.mlp_proj(hook("mlp.hook_post", self.act(pre))))
        return hook("hook_resid_post", x + out)


class GPT2(Model):
    """tokens [batch, seq] -> logits [batch, seq, vocab_size]."""

    def __init__(self, c: GPT2Config, w):
        self.config = c
        self.wte = nnx.Param(w("wte.weight", (c.vocab_size, c.d_model)))
        self.wpe = nnx.Param(w("wpe.weight", (c.n_ctx, c.d_model)))
        self.h = nnx.List([Block(w, f"h.{i}", c) for i in range(c.n_layers)])
        self.ln_f = LayerNorm(w, "ln_f", c.d_model, c.layer_norm_eps)
        # lm_head.weight sits outside the "transformer." prefix, so it is asked for under its full name.
        self.lm_head = (
            None if c.tie_word_embeddings else nnx.Param(w.unprefixed("lm_head.weight", (c.vocab_size, c.d_model)))
        )

    def forward(self, tokens: jax.Array, hooks: Hooks, attention_mask) -> jax.Array:
        x = self.wte[...][tokens] + self.wpe[...][: tokens.shape[1]]
        for i, block in enumerate(self.h):
            x = block(x, hooks.at(i), attention_mask)
        unembed = self.wte if self.lm_head is None else self.lm_head
        return hooks("hook_logits", self.ln_f(x, hooks, "ln_final.hook_scale") @ unembed[...].T)


def hf_state(model: GPT2) -> dict[str, np.ndarray]:
    """The parameters under transformers' GPT2LMHeadModel names, float32, Conv1D layout ([in, out])."""
    out = {"transformer.wte.weight": model.wte[...], "transformer.wpe.weight": model.wpe[...]}
    for i, b in enumerate(model.h):
        p = f"transformer.h.{i}"
        for name, mod in (("ln_1", b.ln_1), ("ln_2", b.ln_2)):
            out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = mod.scale[...], mod.bias[...]
        for name, mod in (
            ("attn.c_attn", b.c_attn),
            ("attn.c_proj", b.c_proj),
            ("mlp.c_fc", b.c_fc),
            ("mlp.c_proj", b.mlp_proj),
        ):
            out[f"{p}.{name}.weight"], out[f"{p}.{name}.bias"] = mod.kernel[...], mod.bias[...]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = model.ln_f.scale[...], model.ln_f.bias[...]
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head[...]
    return {k: np.ascontiguousarray(np.asarray(jax.device_get(v), np.float32)) for k, v in out.items()}


def save_hf(model: GPT2, path: str | Path) -> None:
    """Write config.json + model.safetensors: a directory transformers' `from_pretrained` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")
    save_file(hf_state(model), path / "model.safetensors", metadata={"format": "pt"})


FAMILIES.register("gpt2", Family(GPT2Config.from_hf, GPT2, prefixes=("transformer.", "")))
