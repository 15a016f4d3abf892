"""Paper-style PNG figures of trained toy models (Elhage et al. 2022, "Toy Models of Superposition").

Plain matplotlib on the Agg canvas, without pyplot, so no global figure state is touched. Every function takes
NumPy arrays and a path, writes one PNG there and returns the path. W is in the paper's orientation
[n_settings, m, n]: column W[s][:, i] is feature i's direction in the m-dimensional hidden space.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, Patch
from matplotlib.ticker import MaxNLocator

DPI = 120
GRAM_CMAP = "RdBu"  # blue = positive, red = negative
SUPERPOSITION_CMAP = "inferno"  # black = no superposition, yellow = superposition >= 1
IMPORTANCE_CMAP = "Purples"
STICKY_FRACTIONS = tuple(map(Fraction, ("1", "3/4", "2/3", "1/2", "2/5", "3/8")))
PHASES = (("not represented", "0.92"), ("dedicated dimension", "tab:blue"), ("superposition", "tab:red"))
MAX_LEGEND_ENTRIES = 16


def _save(fig: Figure, path: str | Path) -> Path:
    """Render `fig` with the Agg canvas, write it to `path` as a PNG and return the path."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, format="png")
    return Path(path)


def _panels(n_panels: int, max_cols: int, panel_size: tuple[float, float]) -> tuple[Figure, list]:
    """A constrained-layout figure with `n_panels` axes wrapped into rows of `max_cols`; spare axes are hidden."""
    ncols = min(n_panels, max_cols)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(max(3.0, panel_size[0] * ncols), panel_size[1] * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_axis_off()
    return fig, list(axes[:n_panels])


def _superposition(W: np.ndarray) -> np.ndarray:
    """Σ_{j≠i} (Ŵ_i·W_j)² for each feature i of W [m, n] -> [n], with Ŵ_i = 0 where ‖W_i‖ < 1e-6."""
    norms = np.linalg.norm(W, axis=0)
    unit = np.where(norms > 1e-6, W / np.maximum(norms, 1e-6), 0.0)
    overlaps = unit.T @ W
    return np.where(np.eye(W.shape[1], dtype=bool), 0.0, overlaps**2).sum(axis=1)


def _draw_gram(ax, W: np.ndarray) -> None:
    """Heatmap of WᵀW [n, n] for W [m, n] on a fixed −1..1 diverging scale."""
    ax.imshow(W.T @ W, cmap=GRAM_CMAP, vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_norms(ax, W: np.ndarray) -> None:
    """Horizontal bars of the feature norms ‖W_i‖ of W [m, n], feature 0 at top, coloured by superposition."""
    norms = np.linalg.norm(W, axis=0)
    colours = matplotlib.colormaps[SUPERPOSITION_CMAP](np.clip(_superposition(W), 0.0, 1.0))
    ax.barh(np.arange(W.shape[1]), norms, height=0.8, color=colours, edgecolor="0.4", linewidth=0.5)
    ax.set_ylim(W.shape[1] - 0.5, -0.5)
    ax.set_xlim(0.0, max(1.1, float(norms.max())))
    ax.set_xticks([0.0, 1.0])
    ax.set_yticks([])


def plot_wtw(W: np.ndarray, labels: list[str], path: str | Path) -> Path:
    """The paper's Figures 2/3: per setting, WᵀW above and the feature norms coloured by superposition below.

    W: [n_settings, m, n]; labels: n_settings panel titles. More than 8 settings wrap into several rows of pairs.
    """
    W = np.asarray(W, dtype=float)
    n_settings = W.shape[0]
    ncols = min(n_settings, 8)
    nblocks = math.ceil(n_settings / ncols)
    fig = Figure(figsize=(max(3.5, 1.6 * ncols + 1.4), 3.4 * nblocks + 0.3), layout="constrained")
    axes = fig.subplots(2 * nblocks, ncols, squeeze=False)
    for s in range(nblocks * ncols):
        top, bottom = axes[2 * (s // ncols), s % ncols], axes[2 * (s // ncols) + 1, s % ncols]
        if s >= n_settings:
            top.set_axis_off()
            bottom.set_axis_off()
            continue
        _draw_gram(top, W[s])
        _draw_norms(bottom, W[s])
        top.set_title(labels[s], fontsize="medium")
    axes[0, 0].set_ylabel("WᵀW")
    axes[1, 0].set_ylabel("‖Wᵢ‖")
    colorbar_height = 0.8 if nblocks == 1 else 0.4
    fig.colorbar(ScalarMappable(Normalize(-1.0, 1.0), GRAM_CMAP), ax=axes, shrink=colorbar_height, label="WᵀW")
    superposition_scale = ScalarMappable(Normalize(0.0, 1.0), SUPERPOSITION_CMAP)
    fig.colorbar(superposition_scale, ax=axes, shrink=colorbar_height, label="superposition")
    return _save(fig, path)


def _importance_colours(importance: np.ndarray) -> np.ndarray:
    """RGBA colours [..., 4] for importance [...]: darker = more important, min..max over all settings."""
    low, high = float(importance.min()), float(importance.max())
    scaled = (importance - low) / (high - low) if high > low else np.ones_like(importance)
    return matplotlib.colormaps[IMPORTANCE_CMAP](0.35 + 0.65 * scaled)


def plot_arrows_2d(W: np.ndarray, labels: list[str], path: str | Path, importance: np.ndarray | None = None) -> Path:
    """Each feature's 2-D direction W[s][:, i] as a line from the origin, one square panel per setting.

    W: [n_settings, 2, n]; importance: [n_settings, n] (or [n], shared) colours the features, darker = more
    important; None draws every feature in one colour.
    """
    W = np.asarray(W, dtype=float)
    if W.ndim != 3 or W.shape[1] != 2:
        raise ValueError(f"plot_arrows_2d needs W of shape [n_settings, 2, n] (m = 2); got shape {W.shape}")
    n_settings, _, n = W.shape
    if importance is None:
        colours = np.broadcast_to(to_rgba("tab:purple"), (n_settings, n, 4))
    else:
        colours = _importance_colours(np.broadcast_to(np.asarray(importance, dtype=float), (n_settings, n)))
    fig, axes = _panels(n_settings, max_cols=6, panel_size=(2.2, 2.4))
    for ax, vectors, feature_colours, label in zip(axes, W, colours, labels):
        ax.add_patch(Circle((0.0, 0.0), 1.0, fill=False, color="0.85", linewidth=0.8))
        for (x, y), colour in zip(vectors.T, feature_colours):
            ax.plot([0.0, x], [0.0, y], color=colour, linewidth=1.5)
            ax.plot([x], [y], "o", color=colour, markersize=4)
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize="medium")
    return _save(fig, path)


def plot_dimensionality(
    feature_probability: np.ndarray,
    d_star: np.ndarray,
    feature_dims: np.ndarray,
    path: str | Path,
    represented: np.ndarray | None = None,
) -> Path:
    """Dimensions per feature D* (line) and each feature's dimensionality D_i (points) against 1/(1−S).

    feature_probability, d_star: [n_settings]; feature_dims: [n_settings, n]; represented: bool [n_settings, n],
    when given only represented features are scattered. Dashed lines mark the sticky fractions 1, 3/4, ..., 3/8.
    """
    inverse_density = 1.0 / np.asarray(feature_probability, dtype=float)
    feature_dims = np.asarray(feature_dims, dtype=float)
    shown = np.ones(feature_dims.shape, dtype=bool) if represented is None else np.asarray(represented, dtype=bool)
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for fraction in STICKY_FRACTIONS:
        ax.axhline(float(fraction), linestyle="--", linewidth=0.7, color="0.6", zorder=0)
        ax.text(1.01, float(fraction), str(fraction), transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    x_per_feature = np.broadcast_to(inverse_density[:, None], feature_dims.shape)
    ax.scatter(x_per_feature[shown], feature_dims[shown], s=10, alpha=0.25, color="tab:blue", linewidths=0)
    order = np.argsort(inverse_density)
    ax.plot(inverse_density[order], np.asarray(d_star, dtype=float)[order], color="black", linewidth=1.5)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.1)
    ax.set_xlabel("1/(1−S)")
    ax.set_ylabel("dimensions per feature")
    return _save(fig, path)


def _log_edges(values: np.ndarray) -> np.ndarray:
    """Cell edges [k + 1] around sorted positive values [k]: geometric midpoints, mirrored at both ends."""
    if len(values) == 1:
        return values[0] * np.array([0.5, 2.0])
    mids = np.sqrt(values[:-1] * values[1:])
    return np.concatenate([[values[0] ** 2 / mids[0]], mids, [values[-1] ** 2 / mids[-1]]])


def _phase_grid(density: np.ndarray, relative_importance: np.ndarray, phase: np.ndarray) -> tuple:
    """(unique densities [nx], unique importances [ny], phases [ny, nx]); ValueError unless the points fill the grid."""
    xs, ix = np.unique(density, return_inverse=True)
    ys, iy = np.unique(relative_importance, return_inverse=True)
    cells = np.unique(iy * xs.size + ix).size
    if not (density.shape == relative_importance.shape == phase.shape and cells == density.size == xs.size * ys.size):
        raise ValueError(
            f"plot_phase needs one point per cell of a full (density × relative importance) grid; got {density.size} "
            f"points for {xs.size} densities × {ys.size} importances ({cells} distinct cells)"
        )
    if xs.min() <= 0 or ys.min() <= 0:
        raise ValueError("plot_phase draws log axes: density and relative_importance must be positive")
    grid = np.empty((ys.size, xs.size), dtype=int)
    grid[iy, ix] = phase
    return xs, ys, grid


def _draw_phase(ax, xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, title: str) -> None:
    """One phase diagram [ny, nx] on log axes, coloured by PHASES."""
    cmap = ListedColormap([colour for _, colour in PHASES])
    ax.pcolormesh(_log_edges(xs), _log_edges(ys), grid, cmap=cmap, vmin=-0.5, vmax=len(PHASES) - 0.5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("feature density (1−S)")
    ax.set_title(title)


def plot_phase(
    density: np.ndarray,
    relative_importance: np.ndarray,
    phase: np.ndarray,
    path: str | Path,
    title: str = "",
    theory: np.ndarray | None = None,
    clear: np.ndarray | None = None,
) -> Path:
    """Phase diagram over (feature density, relative importance), both on log axes; with `theory`, the paper's
    theory panel beside it (§4).

    density, relative_importance, phase, theory: [k], one entry per setting of a full grid; phase 0 = not
    represented, 1 = dedicated dimension, 2 = superposition. clear: bool [k], where the theory's best phase wins by
    a clear margin; the other theory cells get a dot, and trained cells that differ from a clear theory cell a cross.
    """
    density, relative_importance = (np.asarray(v, dtype=float).ravel() for v in (density, relative_importance))
    cells = lambda values: _phase_grid(density, relative_importance, np.asarray(values, dtype=int).ravel())
    xs, ys, trained = cells(phase)
    panels = {"trained": trained} if theory is None else {"trained": trained, "theory": cells(theory)[2]}
    fig = Figure(figsize=(3.6 + 3.4 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (name, grid) in zip(axes, panels.items()):
        _draw_phase(ax, xs, ys, grid, name)
    axes[0].set_ylabel("relative importance of the extra feature")
    handles = [Patch(facecolor=colour, edgecolor="0.5", label=name) for name, colour in PHASES]
    if theory is not None and clear is not None:
        is_clear = cells(clear)[2] > 0
        iy, ix = np.nonzero(~is_clear)
        axes[1].plot(xs[ix], ys[iy], ".", color="0.25")
        iy, ix = np.nonzero(is_clear & (trained != panels["theory"]))
        axes[0].plot(xs[ix], ys[iy], "x", color="black")
        handles += [
            Line2D([], [], marker=".", linestyle="", color="0.25", label="theory: no clear winner"),
            Line2D([], [], marker="x", linestyle="", color="black", label="trained ≠ clear theory"),
        ]
    fig.suptitle(title)
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_neurons(W: np.ndarray, labels: list[str], path: str | Path) -> Path:
    """Neuron × feature heatmap of each setting's weights (rows of W[s] are neurons), one panel per setting.

    W: [n_settings, m, n]. One diverging scale, symmetric about 0, shared by every panel.
    """
    W = np.asarray(W, dtype=float)
    limit = max(float(np.abs(W).max()), 1e-6)
    fig, axes = _panels(W.shape[0], max_cols=4, panel_size=(3.0, 2.6))
    for ax, weights, label in zip(axes, W, labels):
        ax.imshow(weights, cmap=GRAM_CMAP, vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("feature")
        ax.set_ylabel("neuron")
        ax.set_title(label, fontsize="medium")
    fig.colorbar(ScalarMappable(Normalize(-limit, limit), GRAM_CMAP), ax=axes, shrink=0.8, label="weight")
    return _save(fig, path)


def plot_loss_curves(steps: np.ndarray, loss_curve: np.ndarray, labels: list[str], path: str | Path) -> Path:
    """Loss against step on a log y axis, one line per setting, with a legend for at most 16 settings.

    steps: [k]; loss_curve: [k, n_settings]; labels: n_settings legend entries.
    """
    loss_curve = np.asarray(loss_curve, dtype=float)
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_prop_cycle(color=matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, loss_curve.shape[1])))
    lines = ax.plot(np.asarray(steps), loss_curve, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if len(labels) <= MAX_LEGEND_ENTRIES:
        ax.legend(lines, labels, fontsize="small", ncols=2 if len(labels) > 8 else 1)
    return _save(fig, path)
