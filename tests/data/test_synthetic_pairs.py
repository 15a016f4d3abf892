"""Synthetic transcoder pairs: x = c · u + noise, y = c · v + noise' with the same coefficients c; without
d_out the source is the SAE source it always was, batch for batch."""

import dataclasses

import jax
import numpy as np
import pytest

from sae.data.synthetic import SyntheticBatches, SyntheticConfig, SyntheticFeatures, SyntheticRowsConfig
from sae.errors import ConfigError

CFG = SyntheticConfig(d_in=16, n_features=48, mean_active=4.0, eval_tokens=300)
SEED = 3


def keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The features', train, eval and sample keys of a SyntheticBatches with this seed (its documented layout)."""
    key = jax.random.PRNGKey(seed)
    return tuple(jax.random.fold_in(key, i) for i in range(4))


def test_without_d_out_batches_are_the_sae_source():
    """d_out=None: x alone, equal to SyntheticFeatures.sample (jitted) on the same keys; no pairs' ground truth."""
    cfg = dataclasses.replace(CFG, noise_std=0.1)
    source = SyntheticBatches(cfg, 0, SEED)
    features_key, train_key, eval_key, sample_key = keys(SEED)
    features = SyntheticFeatures.create(cfg, features_key)
    sample = jax.jit(features.sample, static_argnums=1)
    assert source.d_out is None and source.n_layers is None and source.ground_truth_in is None
    np.testing.assert_array_equal(source.ground_truth, features.directions)
    train = list(source.train_batches(64, 3, seed=5, start_batch=1))
    for i, batch in zip((1, 2), train):
        expected = sample(jax.random.fold_in(jax.random.fold_in(train_key, 5), i), 64)
        np.testing.assert_array_equal(batch, expected)
    eval_ = list(source.eval_batches(128))
    assert [b.shape for b in eval_] == [(128, 16)] * 3
    np.testing.assert_array_equal(eval_[2], sample(jax.random.fold_in(eval_key, 2), 128))
    np.testing.assert_array_equal(source.sample(32, 7), sample(jax.random.fold_in(sample_key, 7), 32))


def test_pairs_share_the_coefficients():
    """noise_std=0: x = c u and y = c v for the c that sample_coefficients gives on the batch's key."""
    cfg = dataclasses.replace(CFG, d_out=24)
    source = SyntheticBatches(cfg, 0, SEED)
    _, train_key, _, _ = keys(SEED)
    u, v = np.asarray(source.ground_truth_in, np.float64), np.asarray(source.ground_truth, np.float64)
    assert u.shape == (48, 16) and v.shape == (48, 24) and source.d_in == 16 and source.d_out == 24
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(u, SyntheticBatches(CFG, 0, SEED).ground_truth)  # the SAE source's directions
    assert np.abs(u @ v[:, :16].T).max() < 0.99  # v is a fresh draw, not u padded
    (x, y), _ = source.train_batches(256, 2, seed=0)
    c = np.asarray(source.features.sample_coefficients(jax.random.fold_in(jax.random.fold_in(train_key, 0), 0), 256))
    assert (c > 0).sum(1).mean() > 1  # several features per row
    np.testing.assert_allclose(x, c @ u, atol=1e-5)
    np.testing.assert_allclose(y, c @ v, atol=1e-5)


def test_pair_noise_is_independent_and_x_is_the_sae_x():
    """With noise, x is exactly the SAE source's x; y − c v is noise of std noise_std uncorrelated with x's."""
    cfg = dataclasses.replace(CFG, d_out=16, noise_std=0.2)
    x, y = SyntheticBatches(cfg, 0, SEED).sample(4096, 1)
    np.testing.assert_array_equal(x, SyntheticBatches(dataclasses.replace(cfg, d_out=None), 0, SEED).sample(4096, 1))
    features = SyntheticBatches(cfg, 0, SEED).features
    c = features.sample_coefficients(jax.random.fold_in(keys(SEED)[3], 1), 4096)
    noise_x = np.asarray(x - c @ features.directions).ravel()
    noise_y = np.asarray(y - c @ features.out_directions).ravel()
    assert noise_y.std() == pytest.approx(0.2, rel=0.02)
    assert abs(np.corrcoef(noise_x, noise_y)[0, 1]) < 0.02


def test_eval_batches_are_deterministic_and_differ_from_training():
    cfg = dataclasses.replace(CFG, d_out=8)
    first = list(SyntheticBatches(cfg, 0, SEED).eval_batches(100))
    again = list(SyntheticBatches(cfg, 0, SEED).eval_batches(100))
    assert len(first) == 3 and all(isinstance(b, tuple) and b[1].shape == (100, 8) for b in first)
    for (x, y), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    ((train_x, _),) = SyntheticBatches(cfg, 0, SEED).train_batches(100, 1, seed=0)
    assert not np.array_equal(train_x, first[0][0])


def test_d_out_is_checked_and_not_for_sae_cache():
    with pytest.raises(ConfigError, match=r"data\.d_out=0 must be a positive number"):
        dataclasses.replace(CFG, d_out=0).check()
    with pytest.raises(ConfigError, match=r"source\.d_out=8: .*sae-train data=synthetic data\.d_out=N"):
        SyntheticRowsConfig(d_out=8).check()
    SyntheticRowsConfig().check()
