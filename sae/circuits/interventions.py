"""Interventions on features in the local replacement model (Ameisen et al. 2025, §2.6 "constrained
patching"; circuit-tracer `feature_intervention`), and generation with them.

`intervene` runs the replacement model of the prompt with every MLP output rebuilt from the features,
y^m = Σ_ℓ a^ℓ W_dec_ℓ[:, m − ℓ] + b_dec^m + x^m W_skip^m + ε^m with the prompt's error terms ε, and the
attention patterns and norm scales frozen (freeze_attention). Each intervention (layer, position, feature,
value) sets that activation to `value` (mode "set": clamp; value 0 ablates) or multiplies it by `value`
(mode "multiply"). Features of the layers in `layers` (a range: constrained patching) keep their clean
activations, so an intervention there acts only through the residual stream directly; features of the
layers after the range, and all of them when `layers` is None, are computed again from their new inputs.
With no interventions the logits are the model's.

`generate` continues the prompt greedily with the interventions held at their positions: each MLP output is
the model's own plus Σ (a' − a) W_dec, a' the activations with the interventions and a those the
transcoders give (the error terms of new positions are not known in advance, so the model's MLP stands in).

Interventions are array arguments: new ones, or new values, never compile again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sae.circuits.replacement import Replacement, constants, recorder, replacement
from sae.circuits.transcoders import Transcoders
from sae.errors import ConfigError
from sae.models.base import Model
from sae.models.generate import sampler

MODES = ("set", "multiply")
SLOTS = 8  # interventions are padded to a multiple of this (layer −1: none)


def _arrays(interventions, n_layers: int, n_pos: int, n_features: int) -> tuple:
    """[(layer, position, feature, value)] -> padded (layer, position, feature, value) arrays; ConfigError
    naming the first entry out of range."""
    items = list(interventions)
    for i, entry in enumerate(items):
        if len(entry) != 4:
            raise ConfigError(f"intervention {i}: {entry!r} is not (layer, position, feature, value)")
        layer, pos, feature, _ = entry
        for name, v, n in (("layer", layer, n_layers), ("position", pos, n_pos), ("feature", feature, n_features)):
            if not 0 <= int(v) < n:
                raise ConfigError(f"intervention {i}: {name} {int(v)} is out of range 0..{n - 1}")
    size = max(SLOTS, -(-len(items) // SLOTS) * SLOTS)
    out = [np.full(size, -1, np.int32), np.zeros(size, np.int32), np.zeros(size, np.int32), np.zeros(size, np.float32)]
    for i, entry in enumerate(items):
        for column, v in zip(out, entry):
            column[i] = v
    return tuple(jnp.asarray(c) for c in out)


def _apply(a: jax.Array, layer: int, edits: tuple, multiply: jax.Array) -> jax.Array:
    """a [P, F] of `layer` with the interventions of that layer applied (the others leave it as it is)."""
    at, pos, feature, value = edits
    mine = at == layer
    old = a[pos, feature]
    new = jnp.where(multiply, old * value, value)
    return a.at[pos, feature].set(jnp.where(mine, new, old))


def _check(layers, mode: str, n_layers: int) -> tuple[np.ndarray, bool]:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: expected one of {list(MODES)}")
    constrained = np.zeros(n_layers, bool)
    if layers is not None:
        layers = range(layers, layers + 1) if isinstance(layers, int) else layers
        if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start < layers.stop <= n_layers:
            raise ConfigError(f"layers={layers!r}: expected a range of layers within 0..{n_layers - 1}")
        constrained[layers.start : layers.stop] = True
    return constrained, mode == "multiply"


def _intervene_fn(r: Replacement):
    def run(state, tc: Transcoders, frozen, tokens, clean, errors, edits, constrained, multiply):
        inputs, acts = {}, []

        def mlp_out(layer):
            def fn(_):
                x = inputs[layer][0]
                a = jnp.where(constrained[layer], clean[layer], tc.activate(layer, tc.preacts(layer, x)))
                acts.append(_apply(a, layer, edits, multiply))
                y = tc.decode_into(layer, acts) + tc.b_dec[layer] + tc.skip(layer, x) + errors[layer]
                return y[None]

            return fn

        replace = constants(frozen)
        for layer, (x_site, y_site) in enumerate(zip(tc.input_sites, tc.output_sites)):
            replace[x_site], replace[y_site] = recorder(inputs, layer), mlp_out(layer)
        with jax.default_matmul_precision("highest"):
            logits = r.net(state)(tokens, replace=replace)
        return logits[0], jnp.stack(acts)

    return jax.jit(run)


def intervene(
    model: Model,
    tc: Transcoders,
    tokens,
    interventions,
    layers: range | int | None = None,
    mode: str = "set",
    freeze_attention: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [P, V], activations [L, P, F]) of the prompt with the interventions (see the module
    docstring). ConfigError for a layer, position or feature out of range, a bad mode or range."""
    r = replacement(model, tc)
    trace = r.trace(tokens)
    n = trace.n_tokens
    constrained, multiply = _check(layers, mode, tc.n_layers)
    edits = _arrays(interventions, tc.n_layers, n, tc.n_features)
    if not hasattr(r, "intervene"):
        r.intervene = _intervene_fn(r)  # compiled once per replacement model
    frozen = trace.frozen if freeze_attention else {}
    logits, acts = r.intervene(
        r.state, tc, frozen, trace.padded, trace.acts, trace.errors, edits, jnp.asarray(constrained), multiply
    )
    return np.asarray(logits[:n]), np.asarray(acts[:, :n])


def generate(
    model: Model,
    tc: Transcoders,
    tokens,
    interventions,
    n_tokens: int,
    mode: str = "set",
) -> list[int]:
    """n_tokens greedily continuing the prompt with the interventions (positions within the prompt) held;
    see the module docstring. ConfigError as for `intervene`."""
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    tc.check(model)
    if not tokens or len(tokens) + n_tokens > model.config.n_ctx:
        raise ConfigError(f"the prompt has {len(tokens)} tokens: it must have 1..{model.config.n_ctx - n_tokens}")
    _, multiply = _check(None, mode, tc.n_layers)
    edits = _arrays(interventions, tc.n_layers, len(tokens), tc.n_features)

    def spliced(args):
        params, edits, multiply = args
        inputs, delta = {}, []

        def mlp_out(layer):
            def fn(y):
                a = params.activate(layer, params.preacts(layer, inputs[layer][0]))
                delta.append(_apply(a, layer, edits, multiply) - a)
                return y + params.decode_into(layer, delta)[None]

            return fn

        replace = {}
        for layer, (x_site, y_site) in enumerate(zip(params.input_sites, params.output_sites)):
            replace[x_site], replace[y_site] = recorder(inputs, layer), mlp_out(layer)
        return replace

    r = replacement(model, tc)
    if not hasattr(r, "sampler"):
        r.sampler = sampler(model, spliced)  # compiled once per replacement model
    return r.sampler(tokens, n_tokens, args=(tc, edits, multiply))
