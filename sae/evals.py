"""Evaluation on held-out activations: reconstruction, sparsity, feature density, ground-truth recovery.

Normalisers: `mse` is per element (mean over tokens and d_in, as torch's mse_loss and SAELens's
metrics/mse); `fvu` = Σ‖y − ŷ‖² / Σ‖y − mean(y)‖² over the whole held-out set (variance about
the mean), y the target (x for an SAE; a CLT's summed over its layers, and also given per layer);
`explained_variance` = 1 − fvu. All in the raw (unnormalised) units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from sae.architectures import SAE, Params
from sae.architectures.base import check_input, pair, rows
from sae.errors import DataError

RECOVERY_COSINE = 0.9


def _batch_sums(sae: SAE):
    """Per-batch sums of a batch x (an SAE: the target is x) or (x, y) (a transcoder). Sums over tokens; a
    CLT's keep its layer axis ([L] for the scalars), and its per-latent sums are flattened layer-major."""

    @jax.jit
    def sums(params, buffers, input_scale, batch):
        x, y = pair(batch)
        x = x.astype(jnp.float32)
        f = sae.encode(params, x * input_scale, buffers)
        if y is None:
            y, y_hat = x, sae.decode(params, f) / input_scale
        else:  # a transcoder's target is not scaled
            y, y_hat = y.astype(jnp.float32), sae.decode(params, f) + sae.skip(params, x * input_scale)
        per_token, tokens = -1, 0  # sums over the last axis (d or features), then over tokens
        return {
            "n": jnp.asarray(x.shape[0], jnp.float32),
            "squared_error": jnp.sum(jnp.square(y - y_hat), axis=per_token).sum(axis=tokens),
            "y_sum": jnp.sum(y, axis=tokens),
            "y_squared": jnp.sum(jnp.square(y), axis=per_token).sum(axis=tokens),
            "l0": jnp.sum(f != 0, axis=per_token).sum(axis=tokens),
            "l1": jnp.sum(jnp.abs(f)),
            "fires": jnp.sum(f != 0, axis=tokens).reshape(-1),
            "activation_sum": jnp.sum(f, axis=tokens).reshape(-1),
            "activation_max": jnp.max(f, axis=tokens).reshape(-1),
        }

    return sums


def _checked(where: str, sae: SAE, batch):
    """A batch as 2-D rows x [n, d_in] (and y [n, d_out]); a CLT's as [n, L, d]. DataError naming the width."""
    x, y = pair(batch)
    if sae.cross_layer:
        return sae.check_layers(where, "a batch's x", x, "d_in"), sae.check_layers(where, "a batch's y", y, "d_out")
    x = rows(check_input(where, "a batch" if y is None else "a batch's x", x, sae.d_in, "d_in"))
    return x if y is None else (x, rows(check_input(where, "a batch's y", y, sae.d_out, "d_out")))


def _accumulate(
    where: str, sae: SAE, params: Params, buffers: dict, input_scale: float, batches: Iterable
) -> dict[str, np.ndarray]:
    """Per-batch sums added up over `batches` (maxima kept as maxima), in float64 on the host; each batch
    [..., d_in] (or a pair) is checked first (DataError naming d_in)."""
    try:
        scale = float(input_scale)
    except (TypeError, ValueError):
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise DataError(f"{where}: input_scale={input_scale!r}; expected a positive finite number")
    sums = _batch_sums(sae)
    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        for name, value in jax.device_get(sums(params, buffers, input_scale, _checked(where, sae, batch))).items():
            value = np.asarray(value, np.float64)
            if name not in totals:
                totals[name] = value
            else:
                totals[name] = np.maximum(totals[name], value) if name == "activation_max" else totals[name] + value
    if not totals or totals["n"] == 0:
        raise DataError(f"{where}: batches held no rows; expected [batch, d_in={sae.d_in}] arrays")
    return totals


def _check_directions(where: str, name: str, w: jax.Array, d_in: int) -> jax.Array:
    """w: [n, d_in] (ground truth or decoder rows), else DataError naming d_in."""
    w = check_input(where, name, w, d_in, "d_in")
    if w.ndim != 2:
        raise DataError(f"{where}: {name} has shape {tuple(w.shape)}; expected (n, d_in={d_in})")
    return w


def _unit(w: jax.Array) -> jax.Array:
    """Rows scaled to unit norm (zero rows stay zero)."""
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def max_cosines(ground_truth: jax.Array, w_dec: jax.Array) -> np.ndarray:
    """[n_features]: each ground-truth direction's largest cosine with any decoder row (both [n, d_in])."""
    if np.ndim(w_dec) != 2:
        raise DataError(f"max_cosines: w_dec has shape {np.shape(w_dec)}; expected (d_sae, d_in)")
    ground_truth = _check_directions("max_cosines", "ground_truth", ground_truth, np.shape(w_dec)[1])
    return np.asarray(jnp.max(_unit(ground_truth) @ _unit(w_dec).T, axis=-1))


def ground_truth_recovery(ground_truth: jax.Array, w_dec: jax.Array) -> dict[str, float]:
    """MMCS (Sharkey, Braun & Millidge 2022) and the fraction of true features matched at cos > 0.9."""
    best = max_cosines(ground_truth, w_dec)
    return {"mmcs": float(best.mean()), "recovered_fraction": float((best > RECOVERY_COSINE).mean())}


def density_histogram(fires: np.ndarray, n_tokens: float) -> dict:
    """log10 feature-density histogram (Towards Monosemanticity's plot); never-firing latents counted apart.
    fires: [d_sae] tokens each latent fired on, out of n_tokens > 0."""
    fires = np.asarray(fires)
    if fires.ndim != 1:
        raise DataError(f"density_histogram: fires has shape {fires.shape}; expected (d_sae,)")
    if not n_tokens > 0:
        raise DataError(f"density_histogram: n_tokens={n_tokens!r}; expected a positive count")
    density = fires / n_tokens
    alive = density[density > 0]
    low = np.floor(np.log10(1.0 / n_tokens))
    counts, edges = np.histogram(np.log10(alive), bins=int(-low) * 4, range=(low, 0.0))
    return {
        "log10_bin_edges": edges.round(4).tolist(),
        "counts": counts.tolist(),
        "never_fired": int((density == 0).sum()),
    }


def evaluate(
    sae: SAE,
    params: Params,
    buffers: dict,
    input_scale: float,
    batches: Iterable,
    ground_truth: jax.Array | None = None,
    ground_truth_in: jax.Array | None = None,
) -> dict:
    """Metrics of the dictionary's inference rule (`encode`) on held-out batches of raw activations: x
    [..., d_in] for an SAE, (x, y) for a transcoder, whose FVU is against y (normalised by y's variance).
    ground_truth: [n_features, d_out] directions the decoder rows should recover; ground_truth_in:
    [n_features, d_in] those the encoder columns should (a transcoder's u; reported as mmcs_encoder).
    A CLT also reports fvu_per_layer and l0_per_layer (its l0 is their mean). DataError for other shapes."""
    if ground_truth is not None:
        _check_directions("evaluate", "ground_truth", ground_truth, sae.d_out)
    if ground_truth_in is not None:
        _check_directions("evaluate", "ground_truth_in", ground_truth_in, sae.d_in)
    totals = _accumulate("evaluate", sae, params, buffers, input_scale, batches)
    n = totals["n"]
    variance = totals["y_squared"] - np.sum(np.square(totals["y_sum"]), axis=-1) / n  # [L] for a CLT
    error = totals["squared_error"]
    fvu = float(np.sum(error) / np.sum(variance))
    metrics = {
        "mse": float(np.sum(error) / (n * np.size(totals["y_sum"]))),
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "l0": float(np.mean(totals["l0"]) / n),
        "l1": float(totals["l1"] / n),
        "eval_tokens": int(n),
        "density_histogram": density_histogram(totals["fires"], n),
    }
    if sae.cross_layer:
        metrics["fvu_per_layer"] = (error / variance).tolist()
        metrics["l0_per_layer"] = (totals["l0"] / n).tolist()
    if ground_truth is not None:
        metrics.update(ground_truth_recovery(ground_truth, params["W_dec"]))
    if ground_truth_in is not None:
        metrics["mmcs_encoder"] = ground_truth_recovery(ground_truth_in, params["W_enc"].T)["mmcs"]
    return metrics


def feature_table(
    sae: SAE,
    params: Params,
    buffers: dict,
    input_scale: float,
    batches: Iterable[jax.Array],
    ground_truth: jax.Array | None = None,
) -> dict[str, np.ndarray]:
    """One row per latent over held-out batches: {feature, density, mean_activation (over the tokens it
    fires on), max_activation} and, with ground truth [n_features, d_in], {true_feature, true_cosine}: the
    true direction closest to its decoder row and their cosine. Each value: [d_sae]. DataError naming d_in
    for a batch or ground truth of another shape."""
    if ground_truth is not None:
        _check_directions("feature_table", "ground_truth", ground_truth, sae.d_out)
    totals = _accumulate("feature_table", sae, params, buffers, input_scale, batches)
    fires = totals["fires"]
    table = {
        "feature": np.arange(sae.n_latents),
        "density": fires / totals["n"],
        "mean_activation": np.where(fires > 0, totals["activation_sum"] / np.maximum(fires, 1), 0.0),
        "max_activation": np.maximum(totals["activation_max"], 0.0),
    }
    if ground_truth is not None:
        cosines = np.asarray(_unit(params["W_dec"]) @ _unit(ground_truth).T)  # [d_sae, n_features]
        table["true_feature"] = cosines.argmax(axis=1)
        table["true_cosine"] = cosines.max(axis=1)
    return table
