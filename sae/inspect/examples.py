"""Token context of the examples: the tokens around each example row and the feature's activation on each.

A row's context is the rows r − before … r + after of the same sequence: row r + j belongs to it when
it exists and its position is position[r] + j (stores cached from a model keep sequences contiguous).
Activations on the context tokens are recomputed per (row, latent) pair, in row order: one dot product
with the latent's encoder column each (`latent_values`), not a re-encoding of every row a window touches,
which at 8192 latents × 32 examples × 12 tokens would be most rows of a 1M-row store again. A cross-layer
transcoder's feature reads its own layer's input only, so pairs are read layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sae.architectures import saelens
from sae.inspect.dictionary import CLTFeatures, Dictionary, feature_layers


def context_rows(example_rows: np.ndarray, positions: np.ndarray, before: int, after: int) -> np.ndarray:
    """example_rows [..., M] (−1: none), positions [n_rows] -> context rows [..., M, before + 1 + after] (−1: none)."""
    offsets = np.arange(-before, after + 1)
    rows = example_rows[..., None].astype(np.int64) + offsets  # [..., M, W]
    inside = (example_rows[..., None] >= 0) & (rows >= 0) & (rows < len(positions))
    safe_rows, safe_centre = np.where(inside, rows, 0), np.maximum(example_rows, 0)[..., None]
    same = positions[safe_rows].astype(np.int64) - positions[safe_centre] == offsets
    return np.where(inside & same, rows, -1).astype(np.int64)


def latent_values(sae: Dictionary) -> Callable:
    """jitted (params, x [P, d_in], features [P], floor [P]) -> [P]: latent features[p]'s activation on row x[p]
    (a CLT's: on x[p], its layer's input; `CLTFeatures.latent_values`).

    SAELens's inference rule (sae/architectures/saelens.py) for one latent at a time: one d_in dot product per
    pair instead of encoding whole rows. TopK needs the row's floor (its k-th largest activation, from the
    statistics pass; 0 when fewer than k latents are positive): the latent is active iff its pre-activation
    reaches it. A transcoder's encoder is its rule's (`LoadedSAE.rule`).
    """
    if isinstance(sae, CLTFeatures):
        return sae.latent_values()
    arch, pre_bias = sae.rule, bool(sae.cfg["apply_b_dec_to_input"])

    @jax.jit
    def values(params, x: jax.Array, features: jax.Array, floor: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        u = x - params["b_dec"] if pre_bias else x
        s = jnp.sum(u * params["W_enc"].T[features], axis=1)  # [P]: one d_in dot product per pair
        latent = {name: params[name][features] for name in saelens.LATENT_TENSORS[arch]}
        return saelens.activate(arch, s, latent, floor)

    return values


def feature_values(
    sae: Dictionary,
    takes: list[Callable[[np.ndarray], np.ndarray]],
    rows: np.ndarray,
    features: np.ndarray,
    row_floor: np.ndarray,
    chunk: int = 16384,
) -> np.ndarray:
    """f[rows[i], features[i]] for pairs (rows [P] ≥ 0, features [P]): [P] float32.

    takes[ℓ](rows) reads layer ℓ's inputs (one layer but for a CLT); row_floor [n_rows, layers]. Pairs go in
    (layer, row) order, `chunk` at a time (the last one padded: one compile); each chunk reads its distinct
    rows of each layer once.
    """
    out = np.zeros(len(rows), np.float32)
    values = latent_values(sae)
    layers = feature_layers(sae, features)
    order = np.lexsort((rows, layers))
    for start in range(0, len(rows), chunk):
        pairs = order[start : start + chunk]
        x = _pair_inputs(takes, rows[pairs], layers[pairs])
        feats, floor = features[pairs], row_floor[rows[pairs], layers[pairs]]
        if len(pairs) < chunk:
            pad = chunk - len(pairs)
            x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
            feats, floor = np.concatenate([feats, np.zeros(pad, feats.dtype)]), np.concatenate([floor, np.zeros(pad)])
        out[pairs] = np.asarray(values(sae.params, x, feats.astype(np.int32), floor.astype(np.float32)))[: len(pairs)]
    return out


def _pair_inputs(takes: list[Callable], rows: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """Each pair's input: rows [P], layers [P] -> x [P, d_in], row rows[p] of layer layers[p]."""
    parts = []
    for layer in np.unique(layers):
        at = np.flatnonzero(layers == layer)
        unique, local = np.unique(rows[at], return_inverse=True)
        parts.append((at, np.asarray(takes[layer](unique))[local]))
    x = np.empty((len(rows), parts[0][1].shape[1]), parts[0][1].dtype)
    for at, values in parts:
        x[at] = values
    return x


def example_context(
    sae: Dictionary,
    takes: list[Callable[[np.ndarray], np.ndarray]],
    token_ids: np.ndarray,
    positions: np.ndarray,
    example_rows: np.ndarray,
    before: int,
    after: int,
    row_floor: np.ndarray,
) -> dict[str, np.ndarray]:
    """Context of example_rows [d_sae, M] (−1: none): `context_tokens` (−1: none) and `context_values`
    [d_sae, M, before + 1 + after]: each context token's id and the example's feature's activation on it
    (takes, row_floor: as for feature_values)."""
    ctx = context_rows(example_rows, positions, before, after)
    feature = np.broadcast_to(np.arange(ctx.shape[0])[:, None, None], ctx.shape)
    valid = ctx >= 0
    values = np.zeros(ctx.shape, np.float32)
    values[valid] = feature_values(sae, takes, ctx[valid], feature[valid], row_floor)
    tokens = np.where(valid, token_ids[np.maximum(ctx, 0)], -1).astype(np.int32)
    return {"context_tokens": tokens, "context_values": values}
