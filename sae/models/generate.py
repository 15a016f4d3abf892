"""Sampling from a causal LM: one jitted step per token on a fixed [1, n_ctx] buffer."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae.models.base import Model, Replace


def sampler(model: Model, replace: Replace | Callable[[jax.Array], Replace] | None = None):
    """fn(prompt, n_tokens, temperature=0.0, seed=0, args=None) -> the n_tokens continuing `prompt`, compiled
    once: greedy when temperature = 0, else sampled with `seed`; a sliding n_ctx window; `replace` spliced in
    at every step ({site: fn}, or a function of `args`, e.g. steering strengths, giving one). Temperature,
    seed and args are traced, and the buffer's shape is fixed, so none of them, nor the text growing, ever
    recompiles."""
    n_ctx = model.config.n_ctx
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, window, length, key, temperature, args):
        spliced = replace(args) if callable(replace) else replace
        logits = nnx.merge(graphdef, state)(window[None], replace=spliced)[0, length - 1].astype(jnp.float32)
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits))

    def run(prompt: list[int], n_tokens: int, temperature: float = 0.0, seed: int = 0, args=None) -> list[int]:
        if not len(prompt):
            raise ValueError("generate needs a non-empty prompt")
        out = [int(t) for t in prompt]
        key = jax.random.PRNGKey(seed)
        t = jnp.float32(temperature)
        for i in range(n_tokens):
            context = out[-n_ctx:]
            window = jnp.zeros(n_ctx, jnp.int32).at[: len(context)].set(jnp.asarray(context, jnp.int32))
            out.append(int(next_token(state, window, len(context), jax.random.fold_in(key, i), t, args)))
        return out[len(prompt) :]

    run.jitted = next_token
    return run


def generate(
    model: Model,
    prompt: list[int],
    n_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    replace: Replace | Callable[[jax.Array], Replace] | None = None,
    args: jax.Array | None = None,
) -> list[int]:
    """n_tokens continuing `prompt` with one `sampler` (callers that generate repeatedly keep the sampler)."""
    return sampler(model, replace)(prompt, n_tokens, temperature, seed, args)


def batch_sampler(model: Model, replace: Replace | Callable[[jax.Array], Replace] | None = None):
    """fn(prompts, n_tokens, temperature=0.0, seed=0, args=None) -> n_tokens continuing each prompt, all
    prompts at once and every token in one jitted loop (no host round trip per token). Each prompt must
    leave room for the new tokens in the n_ctx window (cut it from the left first); `replace` and the traced
    arguments as in `sampler`. A new n_tokens or batch size compiles anew."""
    n_ctx = model.config.n_ctx
    graphdef, state = nnx.split(model)

    @partial(jax.jit, static_argnums=3)
    def run(state, buffer, lengths, n_tokens, key, temperature, args):
        spliced = replace(args) if callable(replace) else replace
        net = nnx.merge(graphdef, state)
        rows = jnp.arange(buffer.shape[0])

        def step(i, carry):
            buffer, lengths = carry
            logits = net(buffer, replace=spliced)[rows, lengths - 1].astype(jnp.float32)
            sampled = jax.random.categorical(jax.random.fold_in(key, i), logits / jnp.maximum(temperature, 1e-6))
            token = jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)
            return buffer.at[rows, lengths].set(token), lengths + 1

        return jax.lax.fori_loop(0, n_tokens, step, (buffer, lengths))[0]

    def call(prompts, n_tokens: int, temperature: float = 0.0, seed: int = 0, args=None) -> list[list[int]]:
        buffer = np.zeros((len(prompts), n_ctx), np.int32)
        for i, p in enumerate(prompts):
            if not len(p) or len(p) + n_tokens > n_ctx:
                raise ValueError(f"prompt {i} has {len(p)} tokens: it must have 1..{n_ctx - n_tokens} to continue")
            buffer[i, : len(p)] = p
        lengths = np.array([len(p) for p in prompts], np.int32)
        key, t = jax.random.PRNGKey(seed), jnp.float32(temperature)
        out = np.asarray(run(state, buffer, lengths, n_tokens, key, t, args))
        return [out[i, n : n + n_tokens].tolist() for i, n in enumerate(lengths)]

    call.jitted = run
    return call
