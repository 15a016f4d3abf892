"""Sampling from a causal LM: one jitted step per token on a fixed [1, n_ctx] buffer."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sae.models.base import Model, Replace


def generate(
    model: Model,
    prompt: list[int],
    n_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    replace: Replace | Callable[[jax.Array], Replace] | None = None,
    args: jax.Array | None = None,
) -> list[int]:
    """n_tokens continuing `prompt` (greedy when temperature = 0), with a sliding n_ctx window and `replace`
    spliced in at every step: {site: fn}, or a function of `args` (e.g. steering strengths) giving one, so
    that new `args` values never recompile. The buffer's shape is fixed, so the text growing never does."""
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    n_ctx = model.config.n_ctx
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, window, length, key, args):
        spliced = replace(args) if callable(replace) else replace
        logits = nnx.merge(graphdef, state)(window[None], replace=spliced)[0, length - 1].astype(jnp.float32)
        if temperature == 0:
            return jnp.argmax(logits)
        return jax.random.categorical(key, logits / temperature)

    out = list(prompt)
    key = jax.random.PRNGKey(seed)
    for i in range(n_tokens):
        context = out[-n_ctx:]
        window = jnp.zeros(n_ctx, jnp.int32).at[: len(context)].set(jnp.asarray(context, jnp.int32))
        out.append(int(next_token(state, window, len(context), jax.random.fold_in(key, i), args)))
    return out[len(prompt) :]
