"""A small decoder-only transformer LM in Flax NNX with named activation sites for caching and splicing.

Pre-LayerNorm blocks (GPT-2 layout) with a ReLU MLP, as the one-layer model of Bricken et al. 2023
("Towards Monosemanticity"), learned positional embeddings and an untied unembedding. Block l computes,
on the residual stream x: [batch, seq, d_model],

    resid_pre  = x
    attn_out   = Attn(LN₁(resid_pre))                   causal multi-head softmax attention
    resid_mid  = resid_pre + attn_out
    mlp_pre    = LN₂(resid_mid) W_in + b_in             [batch, seq, d_mlp]
    mlp_post   = ReLU(mlp_pre)                          [batch, seq, d_mlp]
    mlp_out    = mlp_post W_out + b_out
    resid_post = resid_mid + mlp_out

and logits = LN_f(x) W_U + b_U. Each site is sown (`nnx.Intermediate`) under `blocks/<l>/<site>`, so
`sae.data.model_source.capture_site(model, "mlp_post")` caches it; `model(tokens, replace={site: fn})`
swaps a site's activation for fn(activation) before anything downstream reads it (the sown value is the
replacement). Site keys are full paths or, when only one layer has it, the bare name. Sites are sown only
under `nnx.capture`, so a plain call (training, `forward`) records nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sae.lm.config import SITES, LMModelConfig

Replace = Mapping[str, Callable[[jax.Array], jax.Array]]


def site_names(n_layers: int) -> list[str]:
    """All sites of an n_layers model, in forward order: ['blocks/0/resid_pre', …, 'blocks/{L-1}/resid_post']."""
    return [f"blocks/{layer}/{name}" for layer in range(n_layers) for name in SITES]


def resolve_site(site: str, n_layers: int) -> str:
    """The full path of `site` ('mlp_post' → 'blocks/0/mlp_post' for one layer); ValueError if unknown or ambiguous."""
    names = site_names(n_layers)
    if site in names:
        return site
    matches = [n for n in names if n.rsplit("/", 1)[-1] == site]
    if len(matches) == 1:
        return matches[0]
    why = f"is ambiguous in a {n_layers}-layer model (give blocks/<layer>/{site})" if matches else "is not a site"
    raise ValueError(f"site {site!r} {why}; sites: {', '.join(SITES)} (as blocks/<layer>/<site>)")


class Attention(nnx.Module):
    """Causal multi-head self-attention: softmax(q kᵀ/√d_head + mask) v, heads concatenated, then W_O."""

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        b, s, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3 * self.n_heads, d // self.n_heads), 3, axis=2)
        scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(d // self.n_heads).astype(x.dtype)
        causal = jnp.tril(jnp.ones((s, s), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        z = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores, axis=-1), v)
        return self.out(z.reshape(b, s, d))


class Block(nnx.Module):
    """One pre-LN transformer block; sows its seven sites (module docstring)."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = Attention(d_model, n_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.w_in = nnx.Linear(d_model, d_mlp, rngs=rngs)
        self.w_out = nnx.Linear(d_mlp, d_model, rngs=rngs)

    def _site(self, name: str, x: jax.Array, replace: Replace) -> jax.Array:
        if name in replace:
            new = replace[name](x)
            if new.shape != x.shape:
                raise ValueError(f"the replacement at site {name!r} has shape {new.shape}; expected {x.shape}")
            x = new.astype(x.dtype)
        if hasattr(self, "__captures__"):  # only under nnx.capture (flax ≥ 0.12 sets it): nothing left on the module
            self.sow(nnx.Intermediate, name, x)
        return x

    def __call__(self, x: jax.Array, replace: Replace) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]; replace: {bare site name: fn} for this block."""
        x = self._site("resid_pre", x, replace)
        x = self._site("resid_mid", x + self._site("attn_out", self.attn(self.ln1(x)), replace), replace)
        post = self._site("mlp_post", jax.nn.relu(self._site("mlp_pre", self.w_in(self.ln2(x)), replace)), replace)
        return self._site("resid_post", x + self._site("mlp_out", self.w_out(post), replace), replace)


class TransformerLM(nnx.Module):
    """tokens [batch, seq] int -> next-token logits [batch, seq, vocab_size] (seq ≤ n_ctx)."""

    def __init__(self, cfg: LMModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        self.cfg, self.vocab_size = dataclasses.replace(cfg), vocab_size
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab_size, cfg.d_model, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Param(init(rngs.params(), (cfg.n_ctx, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg.d_model, cfg.n_heads, cfg.d_mlp, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.unembed = nnx.Linear(cfg.d_model, vocab_size, kernel_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array, replace: Replace | None = None) -> jax.Array:
        s = tokens.shape[1]
        if s > self.cfg.n_ctx:
            raise ValueError(f"sequences of {s} tokens exceed the model's n_ctx={self.cfg.n_ctx}")
        per_block: list[dict] = [{} for _ in self.blocks]
        for site, fn in (replace or {}).items():
            layer, name = resolve_site(site, self.cfg.n_layers).split("/")[1:]
            per_block[int(layer)][name] = fn
        x = self.embed(tokens) + self.pos_embed[...][:s]
        for block, rep in zip(self.blocks, per_block):
            x = block(x, rep)
        return self.unembed(self.ln_f(x))


def build(cfg: LMModelConfig, vocab_size: int, seed: int = 0) -> TransformerLM:
    """A freshly initialised model (parameters from `seed`)."""
    return TransformerLM(cfg, vocab_size, rngs=nnx.Rngs(seed))


def token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy in nats, −log p(tokens[:, t+1] | ≤ t): [batch, seq − 1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def forward(model: TransformerLM, replace: Replace | None = None) -> Callable[[jax.Array], jax.Array]:
    """A jitted pure function tokens [batch, seq] -> logits [batch, seq, vocab] with `replace` spliced in.

    The model is split once; each call merges its state inside `jax.jit` (the model is left unchanged).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state: nnx.State, tokens: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(tokens, replace)

    return lambda tokens: run(state, jnp.asarray(tokens, jnp.int32))


def generate(
    model: TransformerLM, prompt: list[int], n_tokens: int, temperature: float = 0.0, seed: int = 0
) -> list[int]:
    """Sample n_tokens continuing `prompt` (greedy when temperature = 0), with a sliding n_ctx window.

    One jitted step per token on a fixed [1, n_ctx] buffer (no recompilation as the text grows).
    """
    n_ctx = model.cfg.n_ctx
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, window, length, key):
        logits = nnx.merge(graphdef, state)(window[None])[0, length - 1].astype(jnp.float32)
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    out = list(prompt)
    key = jax.random.PRNGKey(seed)
    for i in range(n_tokens):
        context = out[-n_ctx:]
        window = jnp.zeros(n_ctx, jnp.int32).at[: len(context)].set(jnp.asarray(context, jnp.int32))
        out.append(int(next_token(state, window, len(context), jax.random.fold_in(key, i))))
    return out[len(prompt) :]
