"""The phase diagrams' theory (toy_models/theory.py, Elhage et al. 2022 §4): its expected loss against the training
loss on sampled data, the known limits of the phase diagrams, and the issue's grid point."""

import jax.numpy as jnp
import numpy as np
import pytest

from toy_models import analysis, data, models, theory

N_SAMPLES = 1 << 19


def sampled_loss(W, b, p, importance, seed=0):
    """models.loss_per_instance on N_SAMPLES draws of the training data (train.Task.batch's distribution)."""
    n = W.shape[1]
    u = data.counter_uniform(jnp.uint32(seed), jnp.uint32(0), (1, n, N_SAMPLES))
    x = data.sparse_features(u, jnp.array([p], jnp.float32))
    params = {"W": jnp.asarray(W, jnp.float32)[None], "b": jnp.asarray(b, jnp.float32)[None]}
    return float(models.loss_per_instance(params, x, jnp.asarray(importance, jnp.float32)[None], "relu")[0])


def numpy_monte_carlo(W, b, p, importance, seed=0):
    """The paper's loss by plain NumPy: (1/n) Σ_i I_i (x_i − ReLU(WᵀW x + b)_i)², averaged over samples."""
    rng = np.random.default_rng(seed)
    n = W.shape[1]
    x = np.where(rng.random((N_SAMPLES, n)) < p, rng.random((N_SAMPLES, n)), 0.0)
    out = np.maximum(x @ W.T @ W + b, 0.0)
    return float(((x - out) ** 2 @ importance).mean() / n)


CASES = [  # W [m, n], b [n], p, I [n]
    (np.array([[1.0, -0.9]]), np.array([-0.05, 0.02]), 0.3, np.array([1.0, 0.5])),
    (np.array([[1.06, -0.2]]), np.array([-0.1, 0.03]), 1.0, np.array([1.0, 2.0])),
    (np.array([[1.0, 0.3, -0.9], [0.1, 1.0, -0.4]]), np.array([-0.1, 0.0, 0.05]), 0.1, np.array([1.0, 1.0, 2.0])),
]


@pytest.mark.parametrize("W, b, p, importance", CASES)
def test_expected_loss_matches_sampled_losses(W, b, p, importance):
    expected = float(theory.expected_loss(jnp.asarray(W), jnp.asarray(b), p, jnp.asarray(importance)))
    assert expected == pytest.approx(numpy_monte_carlo(W, b, p, importance), rel=0.02)
    assert expected == pytest.approx(sampled_loss(W, b, p, importance), rel=0.02)
    batched = theory.expected_losses(W[None], b[None], np.array([p]), importance[None])
    assert batched[0] == pytest.approx(expected, rel=1e-5)


def test_quadrature_weights_are_the_feature_distribution():
    x, weights = theory.quadrature(2, 0.3)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-6)
    assert float(weights @ (x[:, 0] == 0)) == pytest.approx(0.7, rel=1e-6)  # P(feature off) = 1 − p
    assert float(weights @ x[:, 1]) == pytest.approx(0.3 * 0.5, rel=1e-6)  # E[x] = p/2
    assert float(weights @ x[:, 1] ** 2) == pytest.approx(0.3 / 3, rel=0.01)  # E[x²] = p/3, midpoint error O(1/K²)


@pytest.fixture(scope="module")
def solvers():
    return {(n, m): theory.PhaseTheory(n, m) for n, m in theory.CANDIDATES}


@pytest.mark.parametrize("n, m", sorted(theory.CANDIDATES))
@pytest.mark.parametrize(
    "p, r, phase",
    [
        (1.0, 0.5, "not represented"),  # dense and less important: the extra feature loses the dimension
        (1.0, 10.0, "dedicated dimension"),  # dense and much more important: it takes a dimension of its own
        (0.01, 0.5, "superposition"),  # sparse: it shares a dimension with another feature
    ],
)
def test_known_limits(solvers, n, m, p, r, phase):
    result = solvers[(n, m)](p, np.append(np.ones(n - 1), r))
    assert analysis.PHASES[result.phase] == phase
    assert result.clear


def test_candidates_stay_in_their_phase(solvers):
    for (n, _), solve in solvers.items():
        for p, r in ((1.0, 0.5), (0.08111, 0.5337), (0.0231, 4.329)):
            for solution in solve(p, np.append(np.ones(n - 1), r)).solutions:
                assert analysis.phase(solution.W) == solution.phase, (n, p, r, solution)


def test_issue_grid_point(solvers):
    """phase_2d at density 0.081, relative importance 0.53: the antipodal pair is the clear winner, ~8× below the
    solution `toy-train toy=phase_2d seed=0` found before (W = [−1.063, −0.202])."""
    p, importance = 0.08111, np.array([1.0, 0.5337])
    result = solvers[(2, 1)](p, importance)
    assert analysis.PHASES[result.phase] == "superposition" and result.margin > 5
    found = float(
        theory.expected_loss(jnp.array([[-1.063, -0.202]]), jnp.array([-0.107, 0.028]), p, jnp.asarray(importance))
    )
    antipodal = min(s.loss for s in result.solutions if s.name == "antipodal pair")
    assert 5 < found / antipodal < 12


def test_phase_theory_rejects_other_sizes():
    with pytest.raises(ValueError, match="n=5, m=2"):
        theory.PhaseTheory(5, 2)
