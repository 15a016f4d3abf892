"""Held-out evaluation metrics against a NumPy computation of their definitions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae.architectures import make_sae
from sae.architectures.relu import ReLUConfig
from sae.errors import DataError
from sae.evals import density_histogram, evaluate, feature_table, ground_truth_recovery


def test_evaluate_matches_numpy():
    d_in, d_sae, scale = 6, 20, 2.0
    sae = make_sae(ReLUConfig(d_sae=d_sae), d_in)
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32),
        sae.init_params(jax.random.PRNGKey(0), jnp.zeros(d_in)),
    )
    x = (rng.normal(size=(300, d_in)) + 3.0).astype(np.float32)
    truth = rng.normal(size=(5, d_in)).astype(np.float32)
    metrics = evaluate(sae, params, {}, scale, [jnp.asarray(x[:128]), jnp.asarray(x[128:])], jnp.asarray(truth))

    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    f = np.maximum((x * scale - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    x_hat = (f @ p["W_dec"] + p["b_dec"]) / scale
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert metrics["explained_variance"] == pytest.approx(1 - fvu, rel=1e-4)
    assert metrics["mse"] == pytest.approx(((x - x_hat) ** 2).mean(), rel=1e-4)
    assert metrics["l0"] == pytest.approx((f > 0).sum(1).mean(), rel=1e-6)
    assert metrics["l1"] == pytest.approx(f.sum(1).mean(), rel=1e-4)
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)
    best = (unit(truth) @ unit(p["W_dec"]).T).max(1)
    assert metrics["mmcs"] == pytest.approx(best.mean(), rel=1e-5)
    hist = metrics["density_histogram"]
    assert sum(hist["counts"]) + hist["never_fired"] == d_sae
    assert hist["never_fired"] == int(((f > 0).sum(0) == 0).sum())


def test_recovery_counts_matches_above_cosine_09():
    truth = np.eye(4, dtype=np.float32)
    w_dec = np.stack([np.eye(4)[0], np.eye(4)[1] + 0.2 * np.eye(4)[2], 2 * np.eye(4)[3], np.ones(4)])
    result = ground_truth_recovery(jnp.asarray(truth), jnp.asarray(w_dec, dtype=jnp.float32))
    cos_second = 1 / np.sqrt(1.04)
    assert result["mmcs"] == pytest.approx((1 + cos_second + 0.5 + 1) / 4, rel=1e-6)
    assert result["recovered_fraction"] == 0.75


def test_density_histogram_bins_log10_density():
    hist = density_histogram(np.array([0, 1, 10, 100, 1000]), 1000.0)
    edges, counts = np.array(hist["log10_bin_edges"]), np.array(hist["counts"])
    assert hist["never_fired"] == 1 and counts.sum() == 4
    for density in (-3, -2, -1, 0):
        assert counts[np.searchsorted(edges, density, side="right") - 1 if density < 0 else -1] == 1


def test_evaluate_and_feature_table_name_the_expected_d_in():
    d_in, d_sae = 6, 20
    sae = make_sae(ReLUConfig(d_sae=d_sae), d_in)
    params = sae.init_params(jax.random.PRNGKey(0), jnp.zeros(d_in))
    x = np.random.default_rng(0).normal(size=(64, d_in)).astype(np.float32)
    flat = evaluate(sae, params, {}, 1.0, [x])
    batched = evaluate(sae, params, {}, 1.0, [x.reshape(4, 16, d_in)])  # any leading dims
    assert {k: batched[k] for k in ("mse", "fvu", "l0", "eval_tokens")} == pytest.approx(
        {k: flat[k] for k in ("mse", "fvu", "l0", "eval_tokens")}
    )
    for fn in (evaluate, feature_table):
        where = fn.__name__
        with pytest.raises(
            DataError, match=re.escape(f"{where}: a batch has shape (64, 5); expected (..., d_in={d_in})")
        ):
            fn(sae, params, {}, 1.0, [x[:, :5]])
        with pytest.raises(
            DataError, match=re.escape(f"{where}: ground_truth has shape (3, 5); expected (..., d_in=6)")
        ):
            fn(sae, params, {}, 1.0, [x], np.ones((3, 5), np.float32))
        with pytest.raises(DataError, match=f"{where}: batches held no rows"):
            fn(sae, params, {}, 1.0, [])
        with pytest.raises(DataError, match=f"{where}: input_scale=0.0; expected a positive finite number"):
            fn(sae, params, {}, 0.0, [x])
    with pytest.raises(
        DataError, match=re.escape("max_cosines: ground_truth has shape (3, 5); expected (..., d_in=6)")
    ):
        ground_truth_recovery(np.ones((3, 5), np.float32), params["W_dec"])
    with pytest.raises(DataError, match=re.escape("density_histogram: fires has shape (2, 3); expected (d_sae,)")):
        density_histogram(np.ones((2, 3)), 10.0)
