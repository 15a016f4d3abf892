"""The theory panel of the phase diagrams (Elhage et al. 2022, §4 "Phase Change"): the expected loss of each
candidate solution, minimised over its free parameters, and the phase of the best one.

The ReLU output model x' = ReLU(WᵀW x + b), W: [m, n], b: [n], with the training loss's normalisation
(models.loss_per_instance):

    L(W, b) = (1/n) Σ_i I_i E[(x_i − x'_i)²],   x_i = 0 with probability 1 − p, else uniform on [0, 1).

The expectation is a quadrature of that distribution: per feature the value 0 with weight 1 − p and the K midpoints
(k + ½)/K with weight p/K each, and their tensor product over the n features ((K + 1)ⁿ nodes): exact over which
features fire, and with an O(1/K²) error over their values. K = 16 and K = 32 give the same phases and the same
clear settings on the phase_2d and phase_3d grids, with 1 + margin within 0.3% of each other.

Candidates (CANDIDATES) are geometries of W, each in one phase of the extra feature (analysis.PHASES): the extra
feature dropped, given a dimension of its own, or in superposition with other features. Each is minimised over its
free norms (and the triangle's angle) and the biases b, from norms 1 and b = 0.01 (slightly positive, so that no
ReLU starts dead), by SLSQP on log L (scale-free: sparse settings, with losses ~p², converge as tightly as
dense ones). A phase's loss is its best candidate's; the theory's phase at a setting is the phase of least loss,
and its margin how much worse the next phase is: L_next / L_best − 1. The paper's theory panel is this diagram.
The candidates are the ideal geometries: a trained model with a partly represented feature (norm < 0.5, say) can
lie a little (up to 1% on these grids) below its phase's candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

from toy_models import analysis

QUADRATURE_POINTS = 16  # K: midpoints per feature value
CLEAR_MARGIN = 0.1  # a phase is clear where the next phase's best loss is more than 10% above the best
SOLVER = {"method": "SLSQP", "options": {"maxiter": 1000, "ftol": 1e-12}}  # scipy.optimize.minimize's


def quadrature(n: int, p: jax.Array, k: int = QUADRATURE_POINTS) -> tuple[jax.Array, jax.Array]:
    """Nodes x: [(k + 1)ⁿ, n] and weights [(k + 1)ⁿ] (summing to 1) of the feature distribution at density p."""
    values = jnp.concatenate([jnp.zeros(1), (jnp.arange(k) + 0.5) / k])
    index = jnp.stack(jnp.meshgrid(*[jnp.arange(k + 1)] * n, indexing="ij"), axis=-1).reshape(-1, n)
    weights = jnp.where(index > 0, p / k, 1.0 - p).prod(axis=1)
    return values[index], weights


def expected_loss(
    W: jax.Array, b: jax.Array, p: jax.Array, importance: jax.Array, k: int = QUADRATURE_POINTS
) -> jax.Array:
    """L(W, b) above for W: [m, n], b: [n], density p and importance I: [n]; a scalar."""
    x, weights = quadrature(W.shape[1], p, k)
    out = jax.nn.relu(x @ (W.T @ W) + b)
    return weights @ ((x - out) ** 2 @ importance) / W.shape[1]


@jax.jit
def _expected_losses(W, b, p, importance):
    return jax.vmap(expected_loss)(W, b, p, importance)


def expected_losses(W: np.ndarray, b: np.ndarray, p: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """expected_loss of many instances: W [I, m, n], b [I, n], p [I], importance [I, n] -> [I]."""
    return np.asarray(_expected_losses(*(jnp.asarray(v, jnp.float32) for v in (W, b, p, importance))))


@dataclass(frozen=True)
class Candidate:
    """One geometry of W in one phase of the extra feature: W(θ) for free parameters θ, started from θ0.

    The norms of its represented features are above analysis.REPRESENTED_NORM, so that analysis.phase of every
    W(θ) is `phase`: a candidate cannot leave its phase by shrinking a feature.
    """

    name: str
    phase: int  # index into analysis.PHASES
    weights: Callable[[jax.Array], jax.Array]  # θ: [k] -> W: [m, n]
    theta0: tuple[float, ...]
    bounds: tuple[tuple[float | None, float | None], ...]


NOT_REPRESENTED, DEDICATED, SUPERPOSITION = range(3)  # indices into analysis.PHASES
NORM = (analysis.REPRESENTED_NORM + 0.01, None)
# the triangle's extra feature has superposition (‖W_0‖² + ‖W_1‖²) cos²θ, above analysis.phase's 0.1 at the
# smallest norms while θ < arccos √(0.1 / (2 · 0.51²)) ≈ 64°
TRIANGLE_MAX_ANGLE = float(np.arccos(np.sqrt(0.1 / (2 * NORM[0] ** 2)))) - 0.01
_2D = (  # n = 2, m = 1: W = [w_0, w_extra]
    Candidate("extra dropped", NOT_REPRESENTED, lambda t: jnp.array([[t[0], 0.0]]), (1.0,), (NORM,)),
    Candidate("feature 0 dropped", DEDICATED, lambda t: jnp.array([[0.0, t[0]]]), (1.0,), (NORM,)),
    Candidate("antipodal pair", SUPERPOSITION, lambda t: jnp.array([[t[0], -t[1]]]), (1.0, 1.0), (NORM, NORM)),
)
_3D = (  # n = 3, m = 2: columns feature 0, feature 1, extra; a dedicated extra feature leaves 0 and 1 one dimension
    # to share (antipodal) or to give to one of them
    Candidate(
        "orthogonal pair, extra dropped",
        NOT_REPRESENTED,
        lambda t: jnp.array([[t[0], 0.0, 0.0], [0.0, t[1], 0.0]]),
        (1.0, 1.0),
        (NORM, NORM),
    ),
    Candidate(
        "extra and feature 0 orthogonal, feature 1 dropped",
        DEDICATED,
        lambda t: jnp.array([[t[0], 0.0, 0.0], [0.0, 0.0, t[1]]]),
        (1.0, 1.0),
        (NORM, NORM),
    ),
    Candidate(
        "extra orthogonal to the antipodal pair 0, 1",
        DEDICATED,
        lambda t: jnp.array([[t[0], -t[1], 0.0], [0.0, 0.0, t[2]]]),
        (1.0, 1.0, 1.0),
        (NORM,) * 3,
    ),
    Candidate(
        "extra antipodal to feature 0, feature 1 orthogonal",
        SUPERPOSITION,
        lambda t: jnp.array([[t[0], 0.0, -t[2]], [0.0, t[1], 0.0]]),
        (1.0, 1.0, 1.0),
        (NORM,) * 3,
    ),
    Candidate(
        "triangle",
        SUPERPOSITION,  # features 0, 1 at angles ±θ, the extra at π; regular at θ = π/3
        lambda t: jnp.array(
            [[t[0] * jnp.cos(t[3]), t[1] * jnp.cos(t[3]), -t[2]], [t[0] * jnp.sin(t[3]), -t[1] * jnp.sin(t[3]), 0.0]]
        ),
        (1.0, 1.0, 1.0, np.pi / 3),
        (NORM,) * 3 + ((0.0, TRIANGLE_MAX_ANGLE),),
    ),
)
CANDIDATES = {(2, 1): _2D, (3, 2): _3D}  # (n, m) -> the candidate solutions of that phase diagram


def _objective(candidate: Candidate, k: int) -> Callable:
    """(log L, ∇ log L) of θ = [θ_W..., b...] as float64 NumPy, for scipy."""

    def log_loss(theta, p, importance):
        n_w = len(candidate.theta0)
        return jnp.log(expected_loss(candidate.weights(theta[:n_w]), theta[n_w:], p, importance, k))

    value_and_grad = jax.jit(jax.value_and_grad(log_loss))

    def fun(theta, p, importance):
        value, grad = value_and_grad(jnp.asarray(theta, jnp.float32), p, importance)
        return float(value), np.asarray(grad, np.float64)

    return fun


@dataclass(frozen=True)
class Solution:
    """A candidate's optimum."""

    name: str
    phase: int  # the candidate's
    loss: float  # L(W, b)
    W: np.ndarray  # [m, n]
    b: np.ndarray  # [n]


@dataclass(frozen=True)
class Theory:
    """The theory at one setting: every candidate's optimum, the best one's phase and the margin to the next phase."""

    solutions: list[Solution]
    phase: int
    margin: float  # L_next phase / L_best − 1

    @property
    def clear(self) -> bool:
        return self.margin > CLEAR_MARGIN


class PhaseTheory:
    """The candidates of one (n, m) with their compiled objectives; call it on (p, I: [n]) for a Theory."""

    def __init__(self, n: int, m: int, k: int = QUADRATURE_POINTS):
        if (n, m) not in CANDIDATES:
            raise ValueError(f"no phase-diagram theory for n={n}, m={m}; have (n, m) in {sorted(CANDIDATES)}")
        self.n, self.k = n, k
        self.candidates = CANDIDATES[(n, m)]
        self.objectives = [_objective(c, k) for c in self.candidates]

    def solve(self, candidate: Candidate, objective: Callable, p: float, importance: np.ndarray) -> Solution:
        """min over θ and b of L(W(θ), b) from θ0 and b = 0.01."""
        theta0 = np.concatenate([candidate.theta0, np.full(self.n, 0.01)])
        bounds = list(candidate.bounds) + [(None, None)] * self.n
        args = (jnp.float32(p), jnp.asarray(importance, jnp.float32))
        theta = minimize(objective, theta0, args=args, jac=True, bounds=bounds, **SOLVER).x
        n_w = len(candidate.theta0)
        W = np.asarray(candidate.weights(jnp.asarray(theta[:n_w], jnp.float32)))
        return Solution(candidate.name, candidate.phase, float(np.exp(objective(theta, *args)[0])), W, theta[n_w:])

    def __call__(self, p: float, importance: np.ndarray) -> Theory:
        solutions = [self.solve(c, f, p, importance) for c, f in zip(self.candidates, self.objectives)]
        by_phase = [min(s.loss for s in solutions if s.phase == phase) for phase in range(len(analysis.PHASES))]
        best, runner_up = np.argsort(by_phase)[:2]
        return Theory(solutions, int(best), by_phase[runner_up] / by_phase[best] - 1)
