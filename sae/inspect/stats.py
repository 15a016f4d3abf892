"""Streaming feature statistics: one jitted step per batch of rows, state a fixed-size pytree.

Per batch x [batch, d_in] (a CLT's [batch, L, d_in]) the dictionary's inference rule gives its code
(sae/inspect/dictionary.py): a TopK SAE's top-k, another's f [batch, d_sae] compacted to a few slots per row
where it fits (`make_step`), and the step folds it into the state, without keeping it:
- `fires`, `total`, `max` [d_sae]: rows where f > 0, the sum of f and its maximum;
- `hist` [d_sae, n_bins + 1]: counts of f in log-spaced bins (each octave split in `bins_per_octave`
  equal parts, read off the float32 bits, no logarithm) over about [hist_min, hist_max]; values outside
  land in the end bins; the extra last column collects the zeros and is dropped at the end;
- `l0_hist` [d_sae + 1]: rows by their number of active latents;
- `top_values`, `top_rows` [d_sae, top_k]: each feature's top_k activations over all rows seen and
  their global row indices, kept by a merge: top_k(concat(state, top_k of this batch)), the batch's
  top_k found exactly from the code's entries (`per_feature_top`; from a dense f, from a few row groups:
  `column_top_k`);
- `random_*` [d_sae, n_random]: a uniform sample of each feature's firing positions among every
  `random_stride`-th row, by bottom-k priority sampling: each (row, feature) gets a hash priority of
  its global row and feature, and the n_random highest among firing positions are kept. The sample
  does not depend on the batch size, and merging is the same top-k.
The final partial batch is padded to the batch size (one compiled step) and masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sae.architectures import saelens
from sae.architectures.capacity import CAPACITIES
from sae.architectures.sparse import top_k_of
from sae.inspect.dictionary import CLTFeatures, Dictionary, topk_layers


class StatsState(NamedTuple):
    """The accumulated statistics (shapes in the module docstring)."""

    fires: jax.Array
    total: jax.Array
    max: jax.Array
    hist: jax.Array
    l0_hist: jax.Array
    top_values: jax.Array
    top_rows: jax.Array
    random_priority: jax.Array
    random_values: jax.Array
    random_rows: jax.Array


def init_state(d_sae: int, n_bins: int, top_k: int, n_random: int) -> StatsState:
    return StatsState(
        fires=jnp.zeros(d_sae, jnp.int32),
        total=jnp.zeros(d_sae, jnp.float32),
        max=jnp.zeros(d_sae, jnp.float32),
        hist=jnp.zeros((d_sae, n_bins + 1), jnp.int32),
        l0_hist=jnp.zeros(d_sae + 1, jnp.int32),
        top_values=jnp.zeros((d_sae, top_k), jnp.float32),
        top_rows=jnp.full((d_sae, top_k), -1, jnp.int32),
        random_priority=jnp.full((d_sae, n_random), -1.0, jnp.float32),
        random_values=jnp.zeros((d_sae, n_random), jnp.float32),
        random_rows=jnp.full((d_sae, n_random), -1, jnp.int32),
    )


def hash_priority(rows: jax.Array, features: jax.Array, seed: int) -> jax.Array:
    """Uniform-looking priorities in [0, 1) from (global row, feature, seed): a murmur3-style integer mix."""
    h = rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) ^ features.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
    h = h ^ jnp.uint32(seed * 0x27D4EB2F % 2**32)
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) / jnp.float32(1 << 24)


def _merge(values: jax.Array, rows: jax.Array, new_values: jax.Array, new_rows: jax.Array, k: int):
    """The k largest of two [d_sae, *] (value, row) sets per feature: [d_sae, k] each."""
    both = jnp.concatenate([values, new_values], axis=1)
    both_rows = jnp.concatenate([rows, new_rows], axis=1)
    top, at = jax.lax.top_k(both, k)
    return top, jnp.take_along_axis(both_rows, at, axis=1)


def group_size(batch: int, k: int) -> int:
    """Rows per group for `column_top_k`: the power of two nearest √(batch / k) that divides batch."""
    g = 1
    while g * 2 <= max(1.0, (batch / k) ** 0.5) * 1.5 and batch % (g * 2) == 0:
        g *= 2
    return g


def column_top_k(values: jax.Array, k: int, group: int) -> tuple[jax.Array, jax.Array]:
    """Each column's k largest entries: values [n, d] -> (top [d, k], row indices [d, k]), exactly.

    Rows are split in groups of `group`; the k groups with the largest maxima hold every one of the k
    largest entries (a group left out has k groups with maxima ≥ its own, so none of its entries can
    rank above k), so one top_k over k·group candidates replaces a top_k over all n rows.
    """
    n, d = values.shape
    n_groups = n // group
    kg = min(k, n_groups)
    v3 = values.reshape(n_groups, group, d)
    _, chosen = jax.lax.top_k(jnp.max(v3, axis=1).T, kg)  # [d, kg] group indices
    candidates = v3[chosen, :, jnp.arange(d)[:, None]].reshape(d, kg * group)
    top, at = jax.lax.top_k(candidates, k)
    return top, jnp.take_along_axis(chosen, at // group, axis=1) * group + at % group


def float_bins(bins_per_octave: int, hist_min: float, hist_max: float) -> tuple[int, int, int, np.ndarray]:
    """Histogram bins read off float32 bit patterns: (shift, first code, n_bins, edges [n_bins + 1]).

    For v > 0, bits(v) >> (23 − log2 bins_per_octave) is the exponent and the top mantissa bits, so bins are
    octaves split in bins_per_octave equal parts; edges are exact float32 values around [hist_min, hist_max].
    """
    shift = 23 - int(np.log2(bins_per_octave))
    code = lambda v: int(np.array(v, np.float32).view(np.int32)) >> shift
    lo, hi = code(hist_min), code(hist_max) + 1
    edges = (np.arange(lo, hi + 1, dtype=np.int32) << shift).view(np.float32)
    return shift, lo, hi - lo, edges


def row_floor(f: jax.Array, layers: int, k: int) -> jax.Array:
    """f [batch, d_sae] -> [batch, layers]: per row and layer, the smallest active value when the layer's
    d_sae / layers latents hold k active ones (TopK's floor), else 0 (always 0 when k = 0: not TopK)."""
    if k == 0:
        return jnp.zeros((f.shape[0], layers), f.dtype)
    by_layer = f.reshape(f.shape[0], layers, -1)
    active = by_layer > 0
    return jnp.where(jnp.sum(active, axis=-1) >= k, jnp.min(jnp.where(active, by_layer, jnp.inf), axis=-1), 0.0)


def per_feature_top(score: jax.Array, feat: jax.Array, payloads: tuple, d_sae: int, k: int, fills: tuple):
    """Each feature's k highest-scoring entries of a sparse list: score, feat, payloads [E] (feat = d_sae: no
    feature; scores > −∞) -> (score [d_sae, k], *payloads [d_sae, k]), highest first, ties to the earlier
    entry; slots past a feature's count hold `fills` (score's first). k rounds of a scatter-max (each
    feature's best remaining score) and a scatter-min (the first entry holding it, then taken): O(k·E), about
    a third of a sort of the E entries on a CPU."""
    n = score.shape[0]
    entry = jnp.arange(n, dtype=jnp.int32)
    inside, safe = feat < d_sae, jnp.minimum(feat, d_sae - 1)

    def take_best(s, _):
        best = jnp.full(d_sae, -jnp.inf, s.dtype).at[feat].max(s, mode="drop")
        holds = inside & (s == best[safe]) & (s > -jnp.inf)
        first = jnp.full(d_sae, n, jnp.int32).at[feat].min(jnp.where(holds, entry, n), mode="drop")  # n: none
        found, at = first < n, jnp.minimum(first, n - 1)
        picked = [best, *(p[at] for p in payloads)]
        return s.at[first].set(-jnp.inf, mode="drop"), tuple(jnp.where(found, a, f) for a, f in zip(picked, fills))

    _, top = jax.lax.scan(take_best, score, None, length=k)
    return tuple(t.T for t in top)


def make_step(
    sae: Dictionary,
    batch_size: int,
    bins_per_octave: int,
    hist_min: float,
    hist_max: float,
    top_k: int,
    n_random: int,
    random_stride: int,
    seed: int,
    capacities: tuple[int, ...] = CAPACITIES,
) -> Callable:
    """step(params, state, x [batch_size, d_in], first_row, n_valid) -> (state, floor [batch_size, layers]),
    jitted with the state donated (a CLT's x [batch_size, L, d_in]). floor: each row's smallest active value
    per layer when the layer has k active latents (TopK), else 0, so that latent j is active on the row iff its
    pre-activation reaches its layer's floor (see examples.py); an SAE has one layer.

    The statistics are folded from the sparse code, (values, latents) [batch_size, C] (`fold_sparse`): a TopK
    SAE's is its top-k (the CPU kernel, never the dense f); another dictionary's f is compacted into the first
    of `capacities` that holds its widest row (a top-C), and a batch no capacity holds is folded from f itself
    (`fold_dense`). Both folds give the same state (tests/inspect)."""
    shift, first_code, n_bins, _ = float_bins(bins_per_octave, hist_min, hist_max)
    d_sae = sae.d_sae
    layers, k = topk_layers(sae)
    n_sampled = batch_size // random_stride
    top_group, random_group = group_size(batch_size, top_k), group_size(n_sampled, n_random)
    topk_sae = not isinstance(sae, CLTFeatures) and sae.rule == "topk"
    caps = tuple(c for c in capacities if c < d_sae)

    def bin_of(v: jax.Array) -> jax.Array:
        return jnp.clip((jax.lax.bitcast_convert_type(v, jnp.int32) >> shift) - first_code, 0, n_bins - 1)

    def merge_random(state, new_priority, new_values, new_rows):
        both_p = jnp.concatenate([state.random_priority, new_priority], axis=1)
        keep_p, keep = jax.lax.top_k(both_p, n_random)
        pick = lambda old, new: jnp.take_along_axis(jnp.concatenate([old, new], axis=1), keep, axis=1)
        return keep_p, pick(state.random_values, new_values), pick(state.random_rows, new_rows)

    def fold_sparse(state: StatsState, vals: jax.Array, idx: jax.Array, rows: jax.Array, valid: jax.Array):
        """vals, idx [batch, C]: each row's active values and their latents (vals ≤ 0: an empty slot)."""
        width = vals.shape[1]
        active = vals > 0
        feat = jnp.where(active, idx, d_sae).reshape(-1)  # [batch·C], d_sae: no latent
        v = vals.reshape(-1)
        top = per_feature_top(v, feat, (jnp.repeat(rows, width),), d_sae, top_k, (0.0, -1))
        feat_s = feat.reshape(batch_size, width)[::random_stride].reshape(-1)
        rows_s = jnp.repeat(rows[::random_stride], width)
        priority = hash_priority(rows_s, feat_s, seed)
        v_s = vals[::random_stride].reshape(-1)
        random = per_feature_top(priority, feat_s, (v_s, rows_s), d_sae, n_random, (-1.0, 0.0, -1))
        l0 = jnp.where(valid, jnp.sum(active, axis=1), d_sae + 1)
        kept = _merge(state.top_values, state.top_rows, *top, top_k)
        return StatsState(
            fires=state.fires.at[feat].add(1, mode="drop"),
            total=state.total.at[feat].add(v, mode="drop"),
            max=jnp.maximum(state.max, top[0][:, 0]),
            hist=state.hist.at[feat, bin_of(v)].add(1, mode="drop"),
            l0_hist=state.l0_hist.at[l0].add(1, mode="drop"),
            top_values=kept[0],
            top_rows=kept[1],
            **dict(zip(("random_priority", "random_values", "random_rows"), merge_random(state, *random))),
        )

    def fold_dense(state: StatsState, f: jax.Array, rows: jax.Array, valid: jax.Array):
        """f [batch, d_sae], the dense code (zero on rows past n_valid)."""
        active = f > 0
        bins = jnp.where(active, bin_of(f), n_bins)
        flat = bins + (n_bins + 1) * jnp.arange(d_sae, dtype=jnp.int32)
        hist = jnp.bincount(flat.reshape(-1), length=d_sae * (n_bins + 1)).reshape(d_sae, n_bins + 1)
        l0 = jnp.where(valid, jnp.sum(active, axis=1), d_sae + 1)
        top_values, at = column_top_k(f, top_k, top_group)
        top = _merge(state.top_values, state.top_rows, top_values, rows[at], top_k)
        f_s, rows_s = f[::random_stride], rows[::random_stride]  # [batch / stride, d_sae]
        priority = jnp.where(f_s > 0, hash_priority(rows_s[:, None], jnp.arange(d_sae)[None, :], seed), -1.0)
        new_priority, at = column_top_k(priority, n_random, random_group)
        random = merge_random(state, new_priority, jnp.take_along_axis(f_s.T, at, axis=1), rows_s[at])
        # Each pass over f [batch, d_sae] costs about as much as the encoder on a CPU, so column statistics
        # come from what is computed anyway: fires from the histogram, the maximum from the top-k; the sum
        # is a matrix-vector product.
        return StatsState(
            fires=state.fires + jnp.sum(hist[:, :n_bins], axis=1, dtype=jnp.int32),
            total=state.total + jnp.ones(batch_size, jnp.float32) @ f,
            max=jnp.maximum(state.max, top_values[:, 0]),
            hist=state.hist + hist.astype(jnp.int32),
            l0_hist=state.l0_hist + jnp.bincount(l0, length=d_sae + 1).astype(jnp.int32),
            top_values=top[0],
            top_rows=top[1],
            **dict(zip(("random_priority", "random_values", "random_rows"), random)),
        )

    def fold_compacted(c: int):
        def fold(state, f, rows, valid):
            vals, idx = top_k_of(f, jnp.zeros(d_sae, f.dtype), c)
            return fold_sparse(state, vals, idx, rows, valid)

        return fold

    @partial(jax.jit, donate_argnums=1)
    def step(params, state: StatsState, x: jax.Array, first_row: jax.Array, n_valid: jax.Array):
        x = x.astype(jnp.float32)
        valid = jnp.arange(batch_size) < n_valid
        rows = first_row + jnp.arange(batch_size, dtype=jnp.int32)
        if topk_sae:
            vals, idx = saelens.topk_code(params, x, bool(sae.cfg["apply_b_dec_to_input"]), k)
            vals = jnp.where(valid[:, None], vals, 0.0)
            floor = jnp.where(vals[:, k - 1 :] > 0, vals[:, k - 1 :], 0.0)  # [batch, 1]: the k-th value
            return fold_sparse(state, vals, idx, rows, valid), floor
        f = dataclasses.replace(sae, params=params).encode(x)  # [batch, d_sae]
        f = jnp.where(valid[:, None], f, 0.0)
        widest = jnp.max(jnp.sum(f > 0, axis=1))
        path = jnp.sum(jnp.asarray(caps, jnp.int32) < widest) if caps else jnp.int32(0)
        folds = [*(fold_compacted(c) for c in caps), fold_dense]
        return jax.lax.switch(path, folds, state, f, rows, valid), row_floor(f, layers, k)

    return step


def accumulate(
    sae: Dictionary,
    batches,
    batch_size: int,
    bins_per_octave: int = 4,
    hist_min: float = 2.0**-14,
    hist_max: float = 2.0**10,
    top_k: int = 16,
    n_random: int = 16,
    random_stride: int = 4,
    seed: int = 0,
    progress: Callable[[int], object] | None = None,
    capacities: tuple[int, ...] = CAPACITIES,
) -> dict[str, np.ndarray]:
    """Statistics of the dictionary's latents over `batches` of (first row, x [≤ batch_size, d_in]; a CLT's
    [≤ batch_size, L, d_in]) as NumPy arrays.

    Returns the StatsState fields plus `n_rows`, `hist_edges` and `row_floor` [n_rows, layers] (TopK's per-row
    activation floor, see make_step); unused top/random slots (features that fired on fewer rows) have row
    −1 and value 0, and random slots are sorted by value, highest first. capacities: the widths a dense code
    is compacted to (make_step); () folds every batch densely.
    """
    d_sae = sae.d_sae
    top_k, n_random = min(top_k, batch_size), min(n_random, batch_size // random_stride)
    step = make_step(
        sae, batch_size, bins_per_octave, hist_min, hist_max, top_k, n_random, random_stride, seed, capacities
    )
    _, _, n_bins, edges = float_bins(bins_per_octave, hist_min, hist_max)
    state = init_state(d_sae, n_bins, top_k, n_random)
    n_rows, floors = 0, []
    for first, x in batches:
        n = x.shape[0]
        if n < batch_size:
            x = jnp.concatenate([jnp.asarray(x), jnp.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
        state, floor = step(sae.params, state, x, jnp.int32(first), jnp.int32(n))
        floors.append(floor[:n])
        n_rows = max(n_rows, first + n)
        if progress is not None:
            progress(n_rows)
    out = {k: np.array(v) for k, v in state._asdict().items()}
    out["hist"] = out["hist"][:, :n_bins]
    layers = topk_layers(sae)[0]
    out["row_floor"] = np.concatenate([np.asarray(f) for f in floors]) if floors else np.zeros((0, layers), np.float32)
    for prefix in ("top", "random"):
        dead = out[f"{prefix}_values"] <= 0
        out[f"{prefix}_rows"][dead] = -1
        out[f"{prefix}_values"][dead] = 0.0
    order = np.argsort(-out["random_values"], axis=1, kind="stable")
    for key in ("random_values", "random_rows"):
        out[key] = np.take_along_axis(out[key], order, axis=1)
    del out["random_priority"]
    out["n_rows"] = np.int64(n_rows)
    out["hist_edges"] = edges.astype(np.float64)
    return out


@partial(jax.jit, static_argnames="k")
def _similar(chunk: jax.Array, rows: jax.Array, offset: jax.Array, k: int):
    sims = chunk @ rows.T  # [chunk, n]
    self_col = offset + jnp.arange(chunk.shape[0])
    sims = sims.at[jnp.arange(chunk.shape[0]), self_col].set(-jnp.inf, mode="drop")
    return jax.lax.top_k(sims, k)


def _unit(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)
    return w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def decoder_neighbours(w_dec: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each decoder row's k most cosine-similar other rows: w_dec [d_sae, D] -> (indices [d_sae, k] int32,
    cosines [d_sae, k]).

    Computed in chunks of rows so memory is chunk × d_sae, never d_sae².
    """
    unit = jnp.asarray(_unit(w_dec))
    d_sae = unit.shape[0]
    k = min(k, d_sae - 1)
    if k <= 0:
        return np.zeros((d_sae, 0), np.int32), np.zeros((d_sae, 0), np.float32)
    chunk = min(chunk, d_sae)
    padded = jnp.concatenate([unit, jnp.zeros((-d_sae % chunk, unit.shape[1]), unit.dtype)])
    idx, cos = [], []
    for start in range(0, d_sae, chunk):
        c, i = _similar(padded[start : start + chunk], unit, jnp.int32(start), k)
        cos.append(np.asarray(c))
        idx.append(np.asarray(i))
    return np.concatenate(idx)[:d_sae].astype(np.int32), np.concatenate(cos)[:d_sae]


def ground_truth_match(w_dec: np.ndarray, ground_truth: np.ndarray, chunk: int = 2048) -> dict[str, np.ndarray]:
    """Best-matching true feature per latent and best latent per true feature, by decoder-row cosine.

    w_dec [d_sae, d_out], ground_truth [n_features, d_out] -> gt_match, gt_cosine [d_sae];
    truth_match, truth_cosine [n_features] (the MMCS of Sharkey et al. is truth_cosine.mean()).
    """
    truth = _unit(ground_truth)
    gt_match, gt_cosine = [], []
    truth_match, truth_cosine = np.zeros(len(truth), np.int32), np.full(len(truth), -np.inf, np.float32)
    for start in range(0, len(w_dec), chunk):
        sims = _unit(w_dec[start : start + chunk]) @ truth.T  # [chunk, n_features]
        gt_match.append(sims.argmax(1).astype(np.int32))
        gt_cosine.append(sims.max(1))
        better = sims.max(0) > truth_cosine
        truth_match[better] = start + sims.argmax(0)[better]
        truth_cosine[better] = sims.max(0)[better]
    return {
        "gt_match": np.concatenate(gt_match),
        "gt_cosine": np.concatenate(gt_cosine),
        "truth_match": truth_match,
        "truth_cosine": truth_cosine,
    }
