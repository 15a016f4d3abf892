"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", §2.2): the model with
every MLP replaced by the transcoders, the attention patterns and the norms' scales frozen at their values
on the prompt, and an error term per layer and position that adds what the transcoders miss, so that its
logits equal the model's. With P positions, L layers of F features:

    x^ℓ_p = the MLP input of layer ℓ (input_sites[ℓ]) at position p        x: [L, P, d]
    a^ℓ_p = σ(x^ℓ_p W_enc^ℓ + b_enc^ℓ)                                      acts: [L, P, F]
    y^m_p = Σ_{ℓ≤m} a^ℓ_p W_dec_ℓ[:, m − ℓ] + b_dec^m + x^m_p W_skip^m + ε^m_p     the MLP output
    ε^m_p = (the model's MLP output) − (the rest)                          errors: [L, P, d]

Frozen patterns and scales make the rest linear: `forward` maps the token embeddings e [P, d] and the MLP
outputs less the skip path, u^m = y^m − x^m W_skip^m [L, P, d], to the MLP inputs and the logits, and is
linear in (e, u). Attribution takes its vector-Jacobian products; `Trace` holds one prompt's values.

Prompts are padded at the end to a multiple of 16 positions (causal attention: the real positions do not
see the padding), so prompts of similar length share one compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae.circuits.transcoders import Transcoders
from sae.errors import DataError
from sae.models.base import FINAL_SITES, FROZEN_SITES, Model

EMBED = "blocks.0.hook_resid_pre"  # the token nodes' vectors: what the embedding writes into the stream
LOGITS = "hook_logits"  # before any final soft-cap: the logits the graph's targets are linear in
BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Trace:
    """One prompt through the model and the transcoders, padded to P ≥ n_tokens positions (device arrays)."""

    tokens: np.ndarray  # [n_tokens] the prompt
    padded: jax.Array  # [1, P] int32
    frozen: dict  # {site: value} attention patterns and norm scales, batch dimension 1
    embed: jax.Array  # [P, d]
    x: jax.Array  # [L, P, d] the MLP inputs
    acts: jax.Array  # [L, P, F]
    writes: jax.Array  # [L, P, d] Σ_ℓ a^ℓ W_dec_ℓ into each layer (no bias, no skip)
    errors: jax.Array  # [L, P, d]
    logits: jax.Array  # [P, V] the model's output (after any soft-cap)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def mlp_in(self, b_dec: jax.Array) -> jax.Array:
        """u = writes + b_dec + errors [L, P, d]: what `forward` adds at each MLP output besides the skip."""
        return self.writes + b_dec[:, None] + self.errors


class Replacement:
    """The local replacement model of `model` with transcoders `tc`: `trace(tokens)` runs the prompt once,
    `forward(trace, embed, mlp_in)` is the frozen linear map. The model is split once; both are jitted."""

    def __init__(self, model: Model, tc: Transcoders):
        tc.check(model)
        self.model, self.tc = model, tc
        self.graphdef, self.state = nnx.split(model)
        n = model.config.n_layers
        self.frozen_sites = [f"blocks.{layer}.{s}" for layer in range(n) for s in FROZEN_SITES] + [FINAL_SITES[0]]
        self._trace = jax.jit(self._trace_fn)
        self.forward_fn = jax.jit(self._forward_fn)

    def net(self, state) -> Model:
        return nnx.merge(self.graphdef, state)

    def padded_length(self, n_tokens: int) -> int:
        n_ctx = self.model.config.n_ctx
        if n_tokens < 1:
            raise DataError("the prompt is empty: attribution needs at least one token")
        if n_tokens > n_ctx:
            raise DataError(f"the prompt has {n_tokens} tokens; the model's context is {n_ctx}")
        return min(n_ctx, -(-n_tokens // BUCKET) * BUCKET)

    def trace(self, tokens) -> Trace:
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        padded = np.zeros((1, self.padded_length(len(tokens))), np.int32)
        padded[0, : len(tokens)] = tokens
        padded = jnp.asarray(padded)
        return Trace(tokens, padded, **self._trace(self.state, self.tc, padded))

    def _trace_fn(self, state, tc: Transcoders, tokens: jax.Array) -> dict:
        capture = [*tc.input_sites, *tc.output_sites, *self.frozen_sites, EMBED]
        with jax.default_matmul_precision("highest"):
            logits, got = self.net(state)(tokens, capture=capture)
            x = jnp.stack([got[s][0] for s in tc.input_sites])
            y = jnp.stack([got[s][0] for s in tc.output_sites])
            acts = [tc.activate(layer, tc.preacts(layer, x[layer])) for layer in range(tc.n_layers)]
            writes = jnp.stack([tc.decode_into(m, acts) + jnp.zeros_like(y[m]) for m in range(tc.n_layers)])
            skip = jnp.stack([tc.skip(m, x[m]) + jnp.zeros_like(y[m]) for m in range(tc.n_layers)])
            errors = y - (writes + tc.b_dec[:, None] + skip)
        frozen = {s: got[s] for s in self.frozen_sites if s in got}
        return dict(
            frozen=frozen,
            embed=got[EMBED][0],
            x=x,
            acts=jnp.stack(acts),
            writes=writes,
            errors=errors,
            logits=logits[0],
        )

    def _forward_fn(
        self, state, tc: Transcoders, frozen: dict, tokens: jax.Array, embed: jax.Array, mlp_in: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(embed [P, d], mlp_in [L, P, d]) -> (x [L, P, d], pre-cap logits [P, V], logits [P, V]) under the
        frozen patterns and scales of `frozen`: linear in (embed, mlp_in)."""
        inputs: dict[int, jax.Array] = {}

        def mlp_out(layer):
            return lambda _: (mlp_in[layer] + tc.skip(layer, inputs[layer][0]))[None]

        replace = constants(frozen)
        replace[EMBED] = lambda _: embed[None]
        for layer, (x_site, y_site) in enumerate(zip(tc.input_sites, tc.output_sites)):
            replace[x_site], replace[y_site] = recorder(inputs, layer), mlp_out(layer)
        with jax.default_matmul_precision("highest"):
            logits, got = self.net(state)(tokens, capture=[LOGITS], replace=replace)
        x = jnp.stack([inputs[layer][0] for layer in range(tc.n_layers)])
        return x, got[LOGITS][0], logits[0]

    def forward(self, trace: Trace, embed: jax.Array, mlp_in: jax.Array):
        return self.forward_fn(self.state, self.tc, trace.frozen, trace.padded, embed, mlp_in)


def recorder(inputs: dict, layer: int):
    """A replace fn that keeps the activation it sees in inputs[layer] and passes it on unchanged."""

    def fn(x):
        inputs[layer] = x
        return x

    return fn


def constants(frozen: dict) -> dict:
    """{site: fn} replacing each frozen site's value with the one recorded on the prompt."""
    return {site: (lambda v: lambda _: v)(value) for site, value in frozen.items()}


_CACHE: dict = {}


def replacement(model: Model, tc: Transcoders) -> Replacement:
    """The Replacement of (model, tc), built once per pair (its jitted functions compile once)."""
    key = (id(model), id(tc))
    if key not in _CACHE or _CACHE[key].model is not model or _CACHE[key].tc is not tc:
        _CACHE.clear()
        _CACHE[key] = Replacement(model, tc)
    return _CACHE[key]
