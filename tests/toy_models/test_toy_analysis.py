"""Toy-model analysis on hand-built W with known answers (Elhage et al. 2022, §2, §5)."""

import numpy as np
import pytest

from toy_models import analysis


def polygon(k: int, n_extra: int = 0) -> np.ndarray:
    """[2, k + n_extra]: k unit vectors evenly spaced on the circle, then zero columns."""
    angles = 2 * np.pi * np.arange(k) / k
    return np.concatenate([np.stack([np.cos(angles), np.sin(angles)]), np.zeros((2, n_extra))], axis=1)


TETRAHEDRON = np.array([[1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]], float) / np.sqrt(3)


@pytest.mark.parametrize(
    "W, dimensionality",
    [
        (np.eye(3), 1.0),  # orthogonal: a dimension each
        (np.array([[1.0, -1.0]]), 1 / 2),  # antipodal pair
        (polygon(5), 2 / 5),  # pentagon
        (TETRAHEDRON, 3 / 4),  # tetrahedron
        (polygon(3), 2 / 3),  # triangle
    ],
)
def test_feature_dimensionality_sticks_at_the_polytope_fractions(W, dimensionality):
    np.testing.assert_allclose(analysis.feature_dimensionality(W), dimensionality, atol=1e-12)
    # for these uniform polytopes D* equals each feature's dimensionality, and ‖W_i‖ = 1
    np.testing.assert_allclose(analysis.dimensions_per_feature(W), dimensionality, atol=1e-12)
    np.testing.assert_allclose(analysis.feature_norms(W), 1.0)


def test_superposition_and_represented():
    W = np.array([[1.0, -1.0, 0.0, 0.1], [0.0, 0.0, 1.0, 0.0]])
    np.testing.assert_allclose(analysis.superposition(W), [1.0 + 0.01, 1.0 + 0.01, 0.0, 2.0])
    np.testing.assert_array_equal(analysis.represented(W), [True, True, True, False])
    # a zero column: no direction, no dimensionality, no superposition of its own
    Z = np.array([[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(analysis.feature_dimensionality(Z), [1.0, 0.0])
    np.testing.assert_allclose(analysis.superposition(Z), [0.0, 0.0])


def test_dimensions_per_feature_counts_the_frobenius_norm():
    W = np.zeros((5, 20))
    W[:, :5] = np.eye(5) * 2.0  # 5 features of norm 2 in 5 dimensions: D* = 5 / 20
    assert analysis.dimensions_per_feature(W) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "W, label, pairs",
    [
        (polygon(5), "pentagon", []),
        (polygon(4), "square", [(0, 2), (1, 3)]),
        (np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.02]]), "orthogonal pair", []),
        (np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]), "antipodal pair", [(0, 1)]),
        (np.array([[1.0, -1.0, 0.6, -0.6], [0.0, 0.0, 0.8, -0.8]]), "2 antipodal pairs", [(0, 1), (2, 3)]),
        (polygon(5, n_extra=2) * np.array([1, 1, 1, 0.2, 1, 1, 1]), "irregular (4 features)", []),
        (np.array([[1.0, 0.1], [0.0, 0.0]]), "one feature", []),
    ],
)
def test_geometry_2d_names_the_arrangement(W, label, pairs):
    result = analysis.geometry_2d(W)
    assert result["label"] == label
    assert result["antipodal_pairs"] == pairs


def test_geometry_2d_rejects_other_widths():
    with pytest.raises(ValueError, match=r"\[2, n\]"):
        analysis.geometry_2d(np.eye(3))


def test_phase_of_the_extra_feature():
    assert analysis.phase(np.array([[1.0, 0.1]])) == 0  # not represented
    assert analysis.phase(np.array([[0.05, 1.0]])) == 1  # dedicated: the other feature dropped
    assert analysis.phase(np.array([[1.0, -1.0]])) == 2  # antipodal superposition
    assert analysis.phase(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])) == 1  # 3 features in 2D, one dropped
    assert analysis.PHASES[analysis.phase(polygon(3))] == "superposition"


def test_neuron_monosemanticity():
    np.testing.assert_allclose(analysis.neuron_monosemanticity(np.eye(4)), 1.0)
    np.testing.assert_allclose(analysis.neuron_monosemanticity(np.ones((2, 5))), 1 / 5)
    np.testing.assert_allclose(analysis.neuron_monosemanticity(np.array([[3.0, 4.0], [0.0, 0.0]])), [16 / 25, 0.0])


def test_pair_cosines():
    W = np.array([[1.0, 0.0, 1.0, -1.0], [0.0, 2.0, 0.0, 0.0]])
    np.testing.assert_allclose(analysis.pair_cosines(W, 2), [0.0, -1.0])
