"""Toy models: the data generator, the models against NumPy, the optimiser against PyTorch's AdamW,
and, at a small budget, the paper's qualitative results (Elhage et al. 2022, §1-§2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toy_models import analysis, data, models
from toy_models.config import (
    ToyConfig,
    ToyConfigError,
    ToyDataConfig,
    ToyModelConfig,
    ToyTrainConfig,
    check,
    settings,
)
from toy_models.train import Task, make_chunk, make_optimizer, train

# --- data -----------------------------------------------------------------------------------------


def test_counter_uniform_is_uniform_deterministic_and_independent_across_steps():
    shape = (4, 32, 1024)
    u0 = np.asarray(data.counter_uniform(jnp.uint32(7), jnp.uint32(0), shape))
    u1 = np.asarray(data.counter_uniform(jnp.uint32(7), jnp.uint32(1), shape))
    other_seed = np.asarray(data.counter_uniform(jnp.uint32(8), jnp.uint32(0), shape))
    np.testing.assert_array_equal(u0, np.asarray(data.counter_uniform(jnp.uint32(7), jnp.uint32(0), shape)))
    assert u0.min() >= 0.0 and u0.max() < 1.0
    assert len(np.unique(u0)) > 0.99 * u0.size  # 24-bit values: a few collisions by chance only
    n = u0.size
    assert abs(u0.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
    assert abs(u0.var() - 1 / 12) < 0.002
    counts, _ = np.histogram(u0, bins=64, range=(0, 1))
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum()
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above 120
    for other in (u1, other_seed, u0.reshape(-1)[1:], u0.reshape(4, -1)[1]):  # steps, seeds, neighbours, instances
        a = u0.reshape(-1)[: other.size]
        assert abs(np.corrcoef(a, other.reshape(-1))[0, 1]) < 0.01


@pytest.mark.parametrize("rng", data.RNG_KINDS)
@pytest.mark.parametrize("signed", [False, True])
def test_sparse_features_fire_with_the_instance_probability(rng, signed):
    p = jnp.array([1.0, 0.3, 0.05])
    u = data.uniform(rng, jnp.uint32(3), jnp.uint32(0), (3, 16, 8192))
    x = np.asarray(data.sparse_features(u, p, signed=signed))
    fires = x != 0
    np.testing.assert_allclose(fires.mean(axis=(1, 2)), p, rtol=0.03)
    for i in range(3):
        values = x[i][fires[i]]
        low, mean = (-1.0, 0.0) if signed else (0.0, 0.5)
        assert values.min() >= low and values.max() < 1.0
        assert abs(values.mean() - mean) < 0.02  # uniform given that it fires
        assert abs(values.var() - (1 / 3 if signed else 1 / 12)) < 0.01


def test_correlated_and_anticorrelated_pairs():
    p = jnp.array([0.2])
    u = data.counter_uniform(jnp.uint32(0), jnp.uint32(0), (1, 7, 50_000))
    x = np.asarray(data.sparse_features(u, p, correlated_pairs=1, anticorrelated_pairs=2))[0] != 0
    np.testing.assert_array_equal(x[0], x[1])  # correlated: fire together
    assert not (x[2] & x[3]).any() and not (x[4] & x[5]).any()  # anti-correlated: never together
    np.testing.assert_allclose(x.mean(axis=1), 0.2, rtol=0.05)  # each feature still fires with p
    assert abs(np.corrcoef(x[0], x[6])[0, 1]) < 0.02  # independent of the rest


# --- models ---------------------------------------------------------------------------------------


def numpy_forward(params, x, kind):
    """The paper's equations for one instance; x: [batch, n]."""
    relu = lambda v: np.maximum(v, 0.0)
    if kind == "abs":
        return relu(relu(x @ params["W1"].T) @ params["W2"].T + params["b"])
    W, b = params["W"], params["b"]
    if kind == "linear":
        return x @ W.T @ W + b
    if kind == "relu":
        return relu(x @ W.T @ W + b)
    return relu(relu(x @ W.T) @ W + b)  # privileged


@pytest.mark.parametrize("kind", models.KINDS)
def test_forward_and_loss_match_numpy(kind):
    params = models.init_params(jax.random.key(0), kind, 3, 6, 4)
    params["b"] = 0.1 * jax.random.normal(jax.random.key(1), (3, 6))
    x = jax.random.uniform(jax.random.key(2), (3, 6, 50), minval=-1)
    importance = jnp.asarray(0.8 ** np.arange(6))[None].repeat(3, 0)
    out = np.asarray(models.forward(params, x, kind))
    loss = np.asarray(models.loss_per_instance(params, x, importance, kind))
    for i in range(3):
        p = {k: np.asarray(v[i], np.float64) for k, v in params.items()}
        xi = np.asarray(x[i], np.float64).T
        expected = numpy_forward(p, xi, kind)
        np.testing.assert_allclose(out[i].T, expected, rtol=1e-5, atol=1e-6)
        target = np.abs(xi) if kind == "abs" else xi
        np.testing.assert_allclose(loss[i], (np.asarray(importance[i]) * (target - expected) ** 2).mean(), rtol=1e-5)


def numpy_adamw(param, grads, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW's update rule, step by step."""
    m = v = np.zeros_like(param)
    for t, g in enumerate(grads, start=1):
        param = param * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        param = param - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return param


def test_optimizer_is_pytorch_adamw():
    rng = np.random.default_rng(0)
    param = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(5)]
    opt = make_optimizer(1e-2, "constant", 100, 0.01)
    p = jnp.asarray(param)
    state = opt.init(p)
    for g in grads:
        updates, state = opt.update(jnp.asarray(g), state, p)
        p = p + updates
    np.testing.assert_allclose(np.asarray(p), numpy_adamw(param, grads, 1e-2, 0.01), rtol=1e-5, atol=1e-6)


def test_chunked_training_equals_one_long_call():
    """lax.scan over steps in calls of 7 and 21 steps gives the same parameters as one call of 28."""
    task = Task("relu", 5, 2, 64)
    fp, imp = jnp.array([1.0, 0.1]), jnp.ones((2, 5))
    opt = make_optimizer(1e-3, "linear", 28, 0.01)
    init = models.init_params(jax.random.key(0), "relu", 2, 5, 2)
    whole = make_chunk(task, opt, 28)(init, opt.init(init), jnp.uint32(0), jnp.uint32(0), fp, imp)[0]
    params, state = init, opt.init(init)
    for start, n in ((0, 7), (7, 21)):
        params, state, _ = make_chunk(task, opt, n)(params, state, jnp.uint32(0), jnp.uint32(start), fp, imp)
    for name in params:
        np.testing.assert_allclose(params[name], whole[name], rtol=1e-5, atol=1e-7)


def test_permuted_init_shifts_and_negates_the_columns_of_one_draw_per_2n_seeds():
    n_seeds, n_settings, n, m = 7, 3, 3, 2
    W = np.asarray(models.permuted_init(jax.random.key(0), "relu", n_seeds, n_settings, n, m)["W"])
    draws = np.asarray(models.init_params(jax.random.key(0), "relu", 2 * n_settings, n, m)["W"])
    W, draws = W.reshape(n_seeds, n_settings, m, n), draws.reshape(2, n_settings, m, n)
    for k in range(n_seeds):
        expected = np.roll(draws[k // (2 * n)], k, axis=-1)  # column i moves to (i + k) mod n
        if k % (2 * n) >= n:
            expected[..., 0] *= -1
        np.testing.assert_array_equal(W[k], expected)
    with pytest.raises(ValueError, match="abs"):
        models.permuted_init(jax.random.key(0), "abs", 2, 1, n, m)


def test_train_from_given_parameters():
    task, fp, imp = Task("relu", 3, 2, 64), np.array([1.0, 0.1, 0.3]), np.ones((3, 3))
    default = train(task, fp, imp, seed=4, steps=20, steps_per_call=20)
    given = train(
        task, fp, imp, seed=4, steps=20, steps_per_call=20, init=models.init_params(jax.random.key(4), "relu", 3, 3, 2)
    )
    np.testing.assert_allclose(given.params["W"], default.params["W"], rtol=1e-6)


# --- the paper's qualitative results, at a small budget ----------------------------------------


@pytest.fixture(scope="module")
def basic_runs():
    """n=20, m=5, I_i = 0.7^i at three sparsities, linear and ReLU (§2, Figure 2)."""
    fp = np.array([1.0, 0.1, 0.01])
    imp = np.tile(0.7 ** np.arange(20), (3, 1))
    return {
        kind: train(Task(kind, 20, 5, 1024), fp, imp, seed=0, steps=3000, steps_per_call=3000)
        for kind in ("linear", "relu")
    }


def test_linear_model_represents_exactly_the_top_m_features(basic_runs):
    for W in basic_runs["linear"].params["W"]:
        np.testing.assert_array_equal(np.flatnonzero(analysis.represented(W)), np.arange(5))
        assert analysis.superposition(W[:, :5]).max() < 0.05  # the top five: orthogonal to each other


def test_relu_model_superposes_more_features_as_sparsity_grows(basic_runs):
    counts = [analysis.represented(W).sum() for W in basic_runs["relu"].params["W"]]
    dense = basic_runs["relu"].params["W"][0]
    np.testing.assert_array_equal(np.flatnonzero(analysis.represented(dense)), np.arange(5))
    assert counts[0] < counts[1] < counts[2], counts
    assert counts[2] >= 10


def test_intro_goes_from_an_orthogonal_pair_to_a_pentagon():
    """n=5, m=2, I_i = 0.9^i (§1, Figure 1); best of 2 seeds per sparsity, as the paper keeps the best."""
    fp = np.tile([1.0, 0.03], 2)
    imp = np.tile(0.9 ** np.arange(5), (4, 1))
    result = train(Task("relu", 5, 2, 1024), fp, imp, seed=0, steps=4000, steps_per_call=4000)
    best = result.eval_loss.reshape(2, 2).argmin(axis=0)
    dense, sparse = (result.params["W"][best[s] * 2 + s] for s in range(2))
    assert analysis.geometry_2d(dense)["label"] == "orthogonal pair"
    assert analysis.geometry_2d(dense)["represented"] == [0, 1]
    assert analysis.geometry_2d(sparse)["label"] == "pentagon"


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, data, message",
    [
        (ToyModelConfig(n_features=0), ToyDataConfig(), "model.n_features=0"),
        (ToyModelConfig(kind="cnn"), ToyDataConfig(), "model.kind='cnn'"),
        (ToyModelConfig(), ToyDataConfig(feature_probability=[0.5, 1.5]), "data.feature_probability"),
        (ToyModelConfig(), ToyDataConfig(feature_probability=[0.0]), "every value in (0, 1]"),
        (ToyModelConfig(n_features=5), ToyDataConfig(importance=[1.0, 0.5]), "5 values"),
        (ToyModelConfig(n_features=4), ToyDataConfig(correlated_pairs=3), "at most model.n_features / 2"),
        (ToyModelConfig(n_features=4), ToyDataConfig(anticorrelated_pairs=1), "≤ 0.5"),
    ],
)
def test_bad_configs_name_the_field(model, data, message):
    with pytest.raises(ToyConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        check(ToyConfig(model=model, data=data))


def test_bad_init_names_the_field():
    with pytest.raises(ToyConfigError, match="train.init='orthogonal'"):
        check(ToyConfig(train=ToyTrainConfig(init="orthogonal")))
    with pytest.raises(ToyConfigError, match="'normal' for the abs model"):
        check(ToyConfig(model=ToyModelConfig(kind="abs"), train=ToyTrainConfig(init="permuted")))


def test_phase_grid_settings():
    cfg = ToyConfig(
        model=ToyModelConfig(n_features=2, n_hidden=1),
        data=ToyDataConfig(feature_probability=[1.0, 0.1], relative_importance=[0.5, 2.0, 4.0]),
    )
    grid = settings(cfg)
    assert len(grid) == 6
    np.testing.assert_allclose(grid.feature_probability, [1.0, 0.1] * 3)
    np.testing.assert_allclose(grid.importance, [[1, 0.5], [1, 0.5], [1, 2], [1, 2], [1, 4], [1, 4]])
