"""The result of an inspection as arrays, per-feature dataclasses, searches and plots (the notebook API).

`Inspection` holds every array of the pass (see sae/inspect/stats.py) plus decoder neighbours, ground-truth
matches and token context; it is saved as `OUT/inspect/stats.npz` + `meta.json` and loaded back with
`load(run_dir)`. `inspection.feature(i)` gives a `Feature` with its `Example`s. A cross-layer transcoder's
features are numbered layer-major (feature ℓ·F + i is feature i of layer ℓ) and carry `decoder_layer_norms`
[L·F, L], each feature's decoder norm into every layer (0 before its own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae.data import DataError

STATS_FILE, META_FILE = "stats.npz", "meta.json"


@dataclass(frozen=True)
class Example:
    """One row where a feature fired. tokens / token_ids / values: the context window (None without token
    ids), values the feature's activation on each context token; centre: the example token's index in it;
    quantile: the example's position in the feature's activation distribution (from the histogram)."""

    row: int
    value: float
    quantile: float
    tokens: list[str] | None = None
    token_ids: np.ndarray | None = None
    values: np.ndarray | None = None
    centre: int = 0


@dataclass(frozen=True)
class Feature:
    """A latent's statistics. hist_counts [n_bins] over hist_edges [n_bins + 1] (log-spaced activations);
    top: its highest activations, highest first; random: a uniform sample of its firing rows, highest first;
    neighbours / neighbour_cosines [n_neighbours]: most similar decoder rows; gt_*: best true feature;
    layer / decoder_layer_norms [L]: a CLT feature's layer and its decoder norm into each layer (None otherwise)."""

    index: int
    density: float
    fires: int
    mean_activation: float
    max_activation: float
    hist_counts: np.ndarray
    hist_edges: np.ndarray
    top: list[Example]
    random: list[Example]
    neighbours: np.ndarray
    neighbour_cosines: np.ndarray
    label: str | None = None
    gt_match: int | None = None
    gt_cosine: float | None = None
    layer: int | None = None
    decoder_layer_norms: np.ndarray | None = None


@dataclass
class Inspection:
    """Arrays of an inspection pass; meta holds run, n_rows, d_sae, d_in, context sizes, thresholds."""

    arrays: dict[str, np.ndarray]
    meta: dict
    vocab: list[str] | None = None
    labels: dict[int, str] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)

    # --- per-latent arrays [d_sae] ---------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return len(self.arrays["fires"])

    @property
    def n_rows(self) -> int:
        return int(self.arrays["n_rows"])

    @property
    def density(self) -> np.ndarray:
        """[d_sae] fraction of rows on which each latent fires."""
        return self.arrays["fires"] / max(self.n_rows, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """[d_sae] mean activation over the rows where the latent fires (0 for dead latents)."""
        return self.arrays["total"] / np.maximum(self.arrays["fires"], 1)

    @property
    def max_activation(self) -> np.ndarray:
        return self.arrays["max"]

    @property
    def dead(self) -> np.ndarray:
        """Indices of latents that never fired in the pass."""
        return np.flatnonzero(self.arrays["fires"] == 0)

    @property
    def ultra_low_density(self) -> np.ndarray:
        """Indices of latents that fired, on fewer than meta['ultra_low_density'] of the rows."""
        return np.flatnonzero((self.arrays["fires"] > 0) & (self.density < self.meta["ultra_low_density"]))

    @property
    def l0(self) -> tuple[np.ndarray, np.ndarray]:
        """(L0 values, row counts): the distribution of active latents per row."""
        counts = self.arrays["l0_hist"]
        return np.arange(len(counts)), counts

    @property
    def has_tokens(self) -> bool:
        return "context_tokens" in self.arrays

    @property
    def has_ground_truth(self) -> bool:
        return "gt_match" in self.arrays

    @property
    def has_layers(self) -> bool:
        """A cross-layer transcoder's inspection: features by layer, with decoder norms per layer."""
        return "decoder_layer_norms" in self.arrays

    def layer(self, i: int) -> int | None:
        """Feature i's layer (a CLT's i // features_per_layer), or None for an SAE or per-layer transcoder."""
        return i // self.meta["features_per_layer"] if self.has_layers else None

    def mmcs(self) -> dict[str, float] | None:
        """Mean max cosine of the true features against the decoder and the fraction above 0.9, or None."""
        if not self.has_ground_truth:
            return None
        best = self.arrays["truth_cosine"]
        return {"mmcs": float(best.mean()), "recovered_fraction": float((best > 0.9).mean())}

    def summary(self) -> dict:
        """Scalars and lists for logging: rows, L0 mean, dead / ultra-low-density latents, recovery, plots."""
        values, counts = self.l0
        out = {
            "n_rows": self.n_rows,
            "dictionary": self.meta.get("dictionary", ""),
            "d_sae": self.d_sae,
            "l0_mean": float((values * counts).sum() / max(self.n_rows, 1)),
            "dead_fraction": len(self.dead) / self.d_sae,
            "dead": self.dead.tolist(),
            "ultra_low_density": self.ultra_low_density.tolist(),
            "median_density": float(np.median(self.density)),
            "plots": {k: str(v) for k, v in self.plots.items()},
        }
        out.update(self.mmcs() or {})
        return out

    def token_string(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        if self.vocab is not None and token_id < len(self.vocab):
            return self.vocab[token_id]
        return f"#{token_id}"

    # --- one feature -------------------------------------------------------------------------------
    def _quantile(self, i: int, value: float) -> float:
        """Fraction of feature i's firing rows below `value`, interpolated in the log-spaced histogram."""
        counts, edges = self.arrays["hist"][i], self.arrays["hist_edges"]
        total = counts.sum()
        if total == 0 or value <= 0:
            return 0.0
        b = int(np.clip(np.searchsorted(edges, value, side="right") - 1, 0, len(counts) - 1))
        lo, hi = np.log10(edges[b]), np.log10(edges[b + 1])
        within = float(np.clip((np.log10(value) - lo) / (hi - lo), 0, 1))
        return float((counts[:b].sum() + within * counts[b]) / total)

    def _examples(self, i: int, kind: str) -> list[Example]:
        rows, values = self.arrays[f"{kind}_rows"][i], self.arrays[f"{kind}_values"][i]
        out = []
        offset = 0 if kind == "top" else self.arrays["top_rows"].shape[1]
        for m in np.flatnonzero(rows >= 0):
            ex = {"row": int(rows[m]), "value": float(values[m]), "quantile": self._quantile(i, float(values[m]))}
            if self.has_tokens:
                ids = self.arrays["context_tokens"][i, offset + m]
                keep = ids >= 0
                ex.update(
                    token_ids=ids[keep],
                    values=self.arrays["context_values"][i, offset + m][keep],
                    tokens=[self.token_string(int(t)) for t in ids[keep]],
                    centre=int(np.sum(keep[: self.meta["context_before"]])),
                )
            out.append(Example(**ex))
        return out

    def feature(self, i: int) -> Feature:
        """Everything known about latent i."""
        if not 0 <= i < self.d_sae:
            raise IndexError(f"feature {i} is not in 0..{self.d_sae - 1}")
        a = self.arrays
        return Feature(
            index=i,
            density=float(self.density[i]),
            fires=int(a["fires"][i]),
            mean_activation=float(self.mean_activation[i]),
            max_activation=float(a["max"][i]),
            hist_counts=a["hist"][i],
            hist_edges=a["hist_edges"],
            top=self._examples(i, "top"),
            random=self._examples(i, "random"),
            neighbours=a["neighbours"][i],
            neighbour_cosines=a["neighbour_cosines"][i],
            label=self.labels.get(i),
            gt_match=int(a["gt_match"][i]) if self.has_ground_truth else None,
            gt_cosine=float(a["gt_cosine"][i]) if self.has_ground_truth else None,
            layer=self.layer(i),
            decoder_layer_norms=a["decoder_layer_norms"][i] if self.has_layers else None,
        )

    def top_token(self, i: int) -> str:
        """The most frequent example token among feature i's top activations ('' without token ids)."""
        if not self.has_tokens:
            return ""
        centre = self.arrays["context_tokens"][i, : self.arrays["top_rows"].shape[1], self.meta["context_before"]]
        centre = centre[centre >= 0]
        return self.token_string(int(np.bincount(centre).argmax())) if len(centre) else ""

    # --- search ------------------------------------------------------------------------------------
    def features_by_token(self, token: str | int, k: int = 10) -> list[tuple[int, float]]:
        """Latents whose top examples sit on `token` (a string of the vocab, or an id), as (latent, fraction
        of its top examples on that token), most specific first; [] when nothing matches."""
        if not self.has_tokens:
            raise ValueError("this inspection has no token ids (the activations were not cached from a model)")
        if isinstance(token, str):
            ids = [j for j, s in enumerate(self.vocab or []) if s == token]
            if not ids and token.startswith("#") and token[1:].isdigit():
                ids = [int(token[1:])]
        else:
            ids = [int(token)]
        n_top = self.arrays["top_rows"].shape[1]
        centre = self.arrays["context_tokens"][:, :n_top, self.meta["context_before"]]  # [d_sae, top_k]
        valid = np.maximum((centre >= 0).sum(1), 1)
        fraction = np.isin(centre, ids).sum(1) / valid
        order = np.argsort(-fraction, kind="stable")[:k]
        return [(int(j), float(fraction[j])) for j in order if fraction[j] > 0]

    def features_by_direction(self, direction: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k latents whose decoder rows are most cosine-similar to direction [D] (see `decoder`):
        (indices, cosines)."""
        w_dec = self.decoder()
        direction = np.asarray(direction, np.float32).reshape(-1)
        if direction.shape[0] != w_dec.shape[1]:
            raise ValueError(f"direction has {direction.shape[0]} entries; the decoder rows have {w_dec.shape[1]}")
        cos = (w_dec / np.maximum(np.linalg.norm(w_dec, axis=1, keepdims=True), 1e-12)) @ (
            direction / max(float(np.linalg.norm(direction)), 1e-12)
        )
        order = np.argsort(-cos, kind="stable")[:k]
        return order, cos[order]

    def decoder(self) -> np.ndarray:
        """The inspected dictionary's decoder rows, read from RUN/sae: W_dec [d_sae, d_out]; a CLT's decoders
        into layers 0..L−1 side by side [L·F, L·d_out] (zeros before each feature's layer)."""
        from sae.inspect.dictionary import decoder_rows, load_dictionary

        return decoder_rows(load_dictionary(Path(self.meta["run"]) / "sae"))

    # --- plots -------------------------------------------------------------------------------------
    def plot_histogram(self, i: int, ax=None):
        """Feature i's activation histogram on a log x-axis (matplotlib Axes)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        edges, counts = self.arrays["hist_edges"], self.arrays["hist"][i]
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#3b6ea8")
        ax.set_xscale("log")
        ax.set_xlabel("activation")
        ax.set_ylabel("rows")
        ax.set_title(f"feature {i}: density {self.density[i]:.3g}, max {self.max_activation[i]:.3g}")
        return ax

    def summary_plots(self, out_dir: str | Path) -> dict[str, Path]:
        """density.png (log10 density, dead latents counted apart), l0.png and, with ground truth,
        recovery.png (MMCS, recovered fraction, per-true-feature best cosine). Returns {name: path}."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        fig, ax = plt.subplots(figsize=(6, 3.5))
        alive = self.density[self.density > 0]
        low = np.floor(np.log10(1.0 / max(self.n_rows, 1)))
        ax.hist(np.log10(alive), bins=max(int(-low) * 8, 8), range=(low, 0), color="#3b6ea8")
        ax.set_xlabel("log10 feature density")
        ax.set_ylabel("latents")
        ax.set_title(f"{len(alive)} firing, {len(self.dead)} dead of {self.d_sae} latents ({self.n_rows:,} rows)")
        paths["density"] = _save(fig, out / "density.png")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        values, counts = self.l0
        last = max(int(np.flatnonzero(counts)[-1]) if counts.any() else 0, 1)
        ax.bar(values[: last + 1], counts[: last + 1], width=1.0, color="#a85b3b")
        mean = float((values * counts).sum() / max(counts.sum(), 1))
        ax.set_xlabel("active latents per row (L0)")
        ax.set_ylabel("rows")
        ax.set_title(f"L0: mean {mean:.2f}")
        paths["l0"] = _save(fig, out / "l0.png")
        if self.has_ground_truth:
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5), width_ratios=[1, 2])
            scores = self.mmcs()
            a1.bar(
                ["MMCS", "recovered\n(cos > 0.9)"],
                [scores["mmcs"], scores["recovered_fraction"]],
                color=["#3b6ea8", "#5ba83b"],
            )
            a1.set_ylim(0, 1)
            for j, v in enumerate(scores.values()):
                a1.text(j, v + 0.02, f"{v:.3f}", ha="center")
            a2.hist(self.arrays["truth_cosine"], bins=40, range=(0, 1), color="#3b6ea8")
            a2.set_xlabel("best decoder cosine of each true feature")
            a2.set_ylabel("true features")
            paths["recovery"] = _save(fig, out / "recovery.png")
        self.plots.update(paths)
        return paths

    # --- files -------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write stats.npz and meta.json (labels, vocab) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / STATS_FILE, **self.arrays)
        meta = {**self.meta, "labels": {str(k): v for k, v in self.labels.items()}, "vocab": self.vocab}
        (out / META_FILE).write_text(json.dumps(meta))
        return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def load(path: str | Path) -> Inspection:
    """The inspection saved in `path` (an inspect directory) or `path/inspect` (a run directory)."""
    path = Path(path)
    if not (path / STATS_FILE).is_file() and (path / "inspect" / STATS_FILE).is_file():
        path = path / "inspect"
    if not (path / STATS_FILE).is_file():
        raise DataError(f"'{path}': no {STATS_FILE} (run `sae-inspect run=RUN` first)")
    with np.load(path / STATS_FILE) as npz:
        arrays = dict(npz)
    meta = json.loads((path / META_FILE).read_text())
    labels = {int(k): v for k, v in meta.pop("labels", {}).items()}
    vocab = meta.pop("vocab", None)
    plots = {p.stem: p for p in path.glob("*.png")}
    return Inspection(arrays, meta, vocab, labels, plots)
