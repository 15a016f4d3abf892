"""Synthetic ground truth (firing rates, correlations) and the memory-mapped .npy source."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae.data import DataError
from sae.data.arrays import ArrayBatches, ArraysConfig
from sae.data.synthetic import SyntheticConfig, SyntheticFeatures, firing_probabilities, normal_quantile


def test_firing_probabilities_decay_and_sum_to_mean_active():
    p = firing_probabilities(100, mean_active=5.0, decay=0.8)
    assert p.sum() == pytest.approx(5.0, rel=1e-5)
    assert np.all(np.diff(p) <= 0)
    np.testing.assert_allclose(p[1:] / p[0], (np.arange(2, 101) / 1.0) ** -0.8, rtol=1e-5)
    capped = firing_probabilities(10, mean_active=4.0, decay=3.0)  # the head would exceed 1
    assert capped.max() == 1.0 and capped.sum() == pytest.approx(4.0, rel=1e-5)


def test_coefficients_fire_at_their_probabilities_with_their_magnitudes():
    cfg = SyntheticConfig(d_in=8, n_features=20, mean_active=4.0, magnitude_mean=2.0, magnitude_std=0.1)
    features = SyntheticFeatures.create(cfg, jax.random.PRNGKey(0))
    c = np.asarray(features.sample_coefficients(jax.random.PRNGKey(1), 50_000))
    p = np.asarray(features.probabilities)
    rate = (c > 0).mean(0)
    assert np.all(np.abs(rate - p) < 5 * np.sqrt(p * (1 - p) / 50_000) + 1e-4)
    assert c[c > 0].mean() == pytest.approx(2.0, abs=0.01)
    x = np.asarray(features.sample(jax.random.PRNGKey(1), 50_000))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(features.directions), axis=1), 1.0, rtol=1e-5)
    assert x.shape == (50_000, 8) and np.isfinite(x).all()


def test_normal_quantile_is_finite_and_normal():
    """Every 24-bit uniform maps to a finite normal quantile (u = 0 and the largest u included), and the
    quantiles of a uniform grid have the normal's mean, spread and tails."""
    u = jnp.arange(2**24, dtype=jnp.float32) * 2.0**-24
    z = np.asarray(jax.jit(normal_quantile)(u))
    assert np.isfinite(z).all() and z.min() > -6 and z.max() < 6
    assert abs(z.mean()) < 1e-3 and z.std() == pytest.approx(1.0, abs=1e-3)
    assert np.mean(z > 1.959964) == pytest.approx(0.025, abs=1e-4)


def test_correlated_groups_fire_together():
    cfg = SyntheticConfig(
        d_in=8,
        n_features=24,
        mean_active=6.0,
        probability_decay=0.0,
        n_correlated_groups=2,
        group_size=3,
        group_correlation=0.9,
    )
    features = SyntheticFeatures.create(cfg, jax.random.PRNGKey(0))
    fires = np.asarray(features.sample_coefficients(jax.random.PRNGKey(2), 40_000)) > 0
    group = np.asarray(features.group)
    corr = np.corrcoef(fires.T)
    same = [(i, j) for i in range(24) for j in range(i) if group[i] >= 0 and group[i] == group[j]]
    independent = [(i, j) for i in range(24) for j in range(i) if group[i] < 0 and group[j] < 0]
    assert len(same) == 6
    assert min(corr[i, j] for i, j in same) > 0.6
    assert max(abs(corr[i, j]) for i, j in independent) < 0.05
    np.testing.assert_allclose(fires.mean(0), 0.25, atol=0.02)  # marginals unchanged


@pytest.fixture
def acts(tmp_path):
    x = np.arange(500 * 3, dtype=np.float16).reshape(500, 3)
    np.save(tmp_path / "acts.npy", x)
    return tmp_path / "acts.npy", x


def test_array_source_epochs_cover_training_rows_once(acts):
    path, x = acts
    source = ArrayBatches(ArraysConfig(path=str(path), eval_tokens=30), 50, 0)
    assert (source.n_train, source.n_eval, source.d_in) == (470, 30, 3)
    batches = [np.asarray(b) for b in source.train_batches(50, 18, seed=0)]  # 9 per epoch, 2 epochs
    first, second = np.concatenate(batches[:9]), np.concatenate(batches[9:])
    for epoch in (first, second):
        rows = epoch[:, 0].astype(int) // 3
        assert len(set(rows)) == 450 and rows.max() < 470  # no repeats, no held-out rows
    assert not np.array_equal(first, second)  # reshuffled
    again = [np.asarray(b) for b in source.train_batches(50, 18, seed=0)]
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(batches))  # seeded
    held_out = np.concatenate([np.asarray(b) for b in source.eval_batches(16)])
    np.testing.assert_array_equal(held_out, x[470:])


def test_array_source_rejects_too_few_rows(acts):
    path, _ = acts
    with pytest.raises(DataError, match="500 rows is too few for trainer.batch_size=1000"):
        ArrayBatches(ArraysConfig(path=str(path)), 1000, 0)
