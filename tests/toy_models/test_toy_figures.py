"""Toy-model figures: each writes a readable, non-blank PNG; the superposition helper; the shape errors."""

import numpy as np
import pytest
from PIL import Image

from toy_models.figures import (
    _superposition,
    plot_arrows_2d,
    plot_dimensionality,
    plot_loss_curves,
    plot_neurons,
    plot_phase,
    plot_wtw,
)

ANGLES = 2 * np.pi * np.arange(5) / 5
PENTAGON = np.stack([np.cos(ANGLES), np.sin(ANGLES)])  # [2, 5]: five features in superposition
ORTHOGONAL_PAIR = np.eye(2, 5)  # [2, 5]: features 0 and 1 get a dimension each, 2-4 are dropped
W = np.stack([PENTAGON, ORTHOGONAL_PAIR])  # [2 settings, m = 2, n = 5]
LABELS = ["p=0.1", "p=0.9"]


def assert_png(path) -> Image.Image:
    """The file is a PNG over 200 × 200 px with more than a few distinct colours."""
    assert path.exists()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 200
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 24)) > 10
        return image


def test_superposition_is_zero_for_orthonormal_and_one_for_antipodal_features():
    np.testing.assert_array_equal(_superposition(np.eye(3)), np.zeros(3))
    np.testing.assert_array_equal(_superposition(np.array([[1.0, -1.0, 0.0]])), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(_superposition(PENTAGON), np.full(5, 1.5))  # Σ_{k=1..4} cos²(2πk/5)
    np.testing.assert_array_equal(_superposition(ORTHOGONAL_PAIR), np.zeros(5))


def test_plot_wtw_wraps_more_than_eight_settings_into_more_rows(tmp_path):
    assert plot_wtw(W, LABELS, tmp_path / "few.png") == tmp_path / "few.png"
    short = assert_png(tmp_path / "few.png")
    many = np.concatenate([W] * 6)  # 12 settings: two rows of column pairs
    tall = assert_png(plot_wtw(many, [f"s{i}" for i in range(12)], tmp_path / "many.png"))
    assert tall.height > 1.5 * short.height


@pytest.mark.parametrize("importance", [None, np.tile(0.7 ** np.arange(5), (2, 1))])
def test_plot_arrows_2d(tmp_path, importance):
    assert_png(plot_arrows_2d(W, LABELS, tmp_path / "arrows.png", importance=importance))


def test_plot_arrows_2d_rejects_three_hidden_dims(tmp_path):
    with pytest.raises(ValueError, match=r"\(2, 3, 5\)"):
        plot_arrows_2d(np.zeros((2, 3, 5)), LABELS, tmp_path / "arrows.png")


@pytest.mark.parametrize("with_represented", [False, True])
def test_plot_dimensionality(tmp_path, with_represented):
    probability = np.geomspace(1.0, 0.01, 6)
    d_star = np.linspace(1.0, 0.4, 6)
    feature_dims = np.clip(d_star[:, None] + 0.05 * np.random.default_rng(0).normal(size=(6, 5)), 0.0, 1.0)
    represented = feature_dims > 0.45 if with_represented else None
    assert_png(plot_dimensionality(probability, d_star, feature_dims, tmp_path / "dims.png", represented=represented))


def phase_grid():
    density, importance = np.meshgrid(np.geomspace(0.01, 1.0, 4), np.geomspace(0.1, 10.0, 3))
    phase = np.where(importance < 0.5, 0, np.where(density < 0.1, 2, 1))
    return density.ravel(), importance.ravel(), phase.ravel()


def test_plot_phase(tmp_path):
    assert_png(plot_phase(*phase_grid(), tmp_path / "phase.png", title="n=2, m=1"))


def test_plot_phase_beside_the_theory(tmp_path):
    density, importance, phase = phase_grid()
    theory = phase.copy()
    theory[0] = 2  # one clear disagreement (crossed), one cell without a clear winner (dotted)
    clear = np.arange(phase.size) != 5
    alone = assert_png(plot_phase(density, importance, phase, tmp_path / "alone.png"))
    both = assert_png(plot_phase(density, importance, phase, tmp_path / "both.png", theory=theory, clear=clear))
    assert both.width > 1.3 * alone.width


def test_plot_phase_rejects_points_that_do_not_fill_a_grid(tmp_path):
    density, importance, phase = phase_grid()
    with pytest.raises(ValueError, match="full"):
        plot_phase(density[1:], importance[1:], phase[1:], tmp_path / "phase.png")
    duplicated = np.concatenate([importance[:1], importance[:-1]])  # one cell twice, another missing
    with pytest.raises(ValueError, match="full"):
        plot_phase(density, duplicated, phase, tmp_path / "phase.png")


def test_plot_neurons(tmp_path):
    weights = np.random.default_rng(0).normal(size=(3, 4, 6))
    assert_png(plot_neurons(weights, ["a", "b", "c"], tmp_path / "neurons.png"))


@pytest.mark.parametrize("n_settings", [3, 20])  # 20 settings: no legend
def test_plot_loss_curves(tmp_path, n_settings):
    steps = np.arange(0, 1000, 50)
    loss = np.exp(-steps[:, None] / 300.0) * np.linspace(0.5, 1.0, n_settings) + 1e-3
    assert_png(plot_loss_curves(steps, loss, [f"p={i}" for i in range(n_settings)], tmp_path / "loss.png"))
