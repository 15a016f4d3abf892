"""Measurements of a trained toy model (Elhage et al. 2022), on one instance's W: [m, n].

Column W_i is feature i's direction; Ŵ_i = W_i / ‖W_i‖.
- feature norm ‖W_i‖; a feature is represented when its norm is near 1 (here: above 0.5)
- superposition of feature i: Σ_{j≠i} (Ŵ_i·W_j)²  (§2, the bar colour in Figure 2)
- dimensions per feature D* = m / ‖W‖_F²  (§5, "Feature Dimensionality")
- feature dimensionality D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)², j including i; 1 for a dedicated dimension, 1/2
  for an antipodal pair, 2/5 for a pentagon, 3/4 for a tetrahedron (the "sticky" fractions)
- for m = 2, the arrangement of the represented features (orthogonal pair, antipodal pairs, polygons)
- for models with a hidden ReLU (privileged basis, abs), per-neuron monosemanticity
"""

from __future__ import annotations

import numpy as np

REPRESENTED_NORM = 0.5
STICKY_FRACTIONS = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8)
PHASES = ("not represented", "dedicated dimension", "superposition")
_TINY = 1e-6


def feature_norms(W: np.ndarray) -> np.ndarray:
    """‖W_i‖: [n]."""
    return np.linalg.norm(W, axis=0)


def represented(W: np.ndarray, threshold: float = REPRESENTED_NORM) -> np.ndarray:
    """Whether each feature has a direction of its own: ‖W_i‖ > threshold, bool [n]."""
    return feature_norms(W) > threshold


def _projections(W: np.ndarray) -> np.ndarray:
    """P[i, j] = Ŵ_i·W_j: [n, n]; rows of features with zero norm are zero."""
    norms = feature_norms(W)
    unit = W / np.where(norms > _TINY, norms, np.inf)
    return unit.T @ W


def superposition(W: np.ndarray) -> np.ndarray:
    """Σ_{j≠i} (Ŵ_i·W_j)²: [n]; 0 for a feature sharing its direction with none."""
    squared = _projections(W) ** 2
    return squared.sum(axis=1) - np.diag(squared)


def dimensions_per_feature(W: np.ndarray) -> float:
    """D* = m / ‖W‖_F²."""
    return W.shape[0] / float(np.sum(W**2))


def feature_dimensionality(W: np.ndarray) -> np.ndarray:
    """D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²: [n]; 0 for features with (numerically) zero norm."""
    squared_norms = feature_norms(W) ** 2
    total = np.sum(_projections(W) ** 2, axis=1)
    return np.where(total > _TINY**2, squared_norms / np.maximum(total, _TINY**2), 0.0)


_POLYGON_NAMES = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon"}


def geometry_2d(W: np.ndarray, threshold: float = REPRESENTED_NORM, angle_tolerance: float = 0.15) -> dict:
    """The arrangement of the represented features of a W: [2, n].

    Returns {'label', 'represented' (indices), 'antipodal_pairs' (index pairs with cosine < −0.9)}.
    Labels: 'none', 'one feature', 'orthogonal pair', 'antipodal pair', a regular polygon by name
    ('pentagon', ...; 'square' is two orthogonal antipodal pairs) when the represented directions are
    evenly spaced within `angle_tolerance` radians, 'k antipodal pairs' when every represented feature
    has an antipodal partner, else 'irregular (k features)'.
    """
    if W.shape[0] != 2:
        raise ValueError(f"geometry_2d needs W of shape [2, n], got {W.shape}")
    index = np.flatnonzero(represented(W, threshold))
    unit = W[:, index] / feature_norms(W)[index]
    cos = unit.T @ unit
    pairs = [
        (int(index[a]), int(index[b])) for a in range(len(index)) for b in range(a + 1, len(index)) if cos[a, b] < -0.9
    ]
    result = {"represented": index.tolist(), "antipodal_pairs": pairs}
    k = len(index)
    if k < 2:
        result["label"] = "none" if k == 0 else "one feature"
        return result
    angles = np.sort(np.arctan2(unit[1], unit[0]))
    gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))
    if k == 2:
        between = min(gaps)
        if abs(between - np.pi / 2) < angle_tolerance:
            result["label"] = "orthogonal pair"
        elif abs(between - np.pi) < angle_tolerance:
            result["label"] = "antipodal pair"
        else:
            result["label"] = "irregular (2 features)"
    elif np.all(np.abs(gaps - 2 * np.pi / k) < angle_tolerance):
        result["label"] = _POLYGON_NAMES.get(k, f"{k}-gon")
    elif 2 * len(pairs) == k:
        result["label"] = f"{len(pairs)} antipodal pairs"
    else:
        result["label"] = f"irregular ({k} features)"
    return result


def neuron_monosemanticity(W: np.ndarray) -> np.ndarray:
    """For neurons h_j = ReLU(Σ_i W[j, i] x_i): the share of neuron j's squared weight on its top feature.

    W: [m neurons, n features] -> [m]; 1 is monosemantic, 1/n evenly polysemantic, 0 for a dead neuron.
    """
    squared = W**2
    total = squared.sum(axis=1)
    return np.where(total > _TINY**2, squared.max(axis=1) / np.maximum(total, _TINY**2), 0.0)


def phase(W: np.ndarray, feature: int = -1, threshold: float = REPRESENTED_NORM, interference: float = 0.1) -> int:
    """The phase of one feature (default: the last, the "extra" feature of the phase diagrams), §4.

    0: not represented (‖W_i‖ ≤ threshold); 1: a dedicated dimension (superposition < `interference`);
    2: represented in superposition with other features. Names in PHASES.
    """
    if feature_norms(W)[feature] <= threshold:
        return 0
    return 1 if superposition(W)[feature] < interference else 2


def pair_cosines(W: np.ndarray, n_pairs: int, first: int = 0) -> list[float]:
    """Cosine between the members of the feature pairs (first + 2k, first + 2k + 1), k < n_pairs."""
    norms = np.maximum(feature_norms(W), _TINY)
    return [float(W[:, a] @ W[:, a + 1] / (norms[a] * norms[a + 1])) for a in range(first, first + 2 * n_pairs, 2)]
