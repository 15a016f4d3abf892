"""One `toy-train` run: train every setting × seed at once, keep the best seed, analyse, save, plot.

Writes to the run directory:
- results.npz: W [S, m, n] (abs model: W1 [S, m, n], W2 [S, n, m]), b [S, n], loss [S],
  feature_probability [S], importance [S, n] for the lowest-loss seed of each of the S settings, plus
  relative_importance [S] (phase diagrams), loss_per_seed [n_seeds, S], eval_loss_per_seed [n_seeds, S] and the
  loss curve. The loss is the held-out one, except for the phase diagrams of the ReLU model (n=2, m=1 and n=3,
  m=2), where it is the exact expected loss (theory.expected_loss): there the phases differ in loss by the joint
  firings of features, ~p² of the samples, too few in the held-out batches to rank the seeds at low density.
- metrics.json: the analysis per setting (features represented, D*, D_i, superposition, geometry,
  phase, neuron monosemanticity), for those phase diagrams the theory's phase, candidate losses and margin
  (theory.py) and the agreement of trained and theoretical phases, and the run's timing.
- *.png: the figures that fit the model and experiment (see `_figures`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from toy_models import analysis, models, theory
from toy_models.config import Settings, ToyConfig, check, settings, to_dict
from toy_models.train import Task, train

MAX_PANELS = 8  # settings shown in the per-setting figures (evenly picked when there are more)


class Stopped(Exception):
    """A run stopped on a signal (`signum`); the message says what was kept and how to go on."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _say(text: str) -> None:
    print(text, flush=True)  # flushed: progress shows at once through a pipe (tee, a log file)


def _signal_name(signum: int) -> str:
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A line per ~5% of the steps (at the ends of compiled calls, where the loss is on the host anyway):
    step, mean loss, steps/s (from the end of the first call: its compilation left out) and ETA.

    toy_models' own small equivalent of sae/progress.py: this package never imports sae.
    """

    def __init__(self, steps: int, log=_say, every: float = 0.05):
        self.steps, self.log, self.every = steps, log, every
        self.start = time.perf_counter()
        self.first: tuple[int, float] | None = None
        self.next = 0

    def __call__(self, step: int, loss: np.ndarray) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        if step < self.next and step < self.steps:
            return
        since = self.first if step > self.first[0] else (0, self.start)
        rate = (step - since[0]) / max(now - since[1], 1e-9)
        self.next = (math.floor(step / (self.every * self.steps)) + 1) * self.every * self.steps
        self.log(
            f"  step {step:>6}/{self.steps} ({100 * step / self.steps:.0f}%)  mean loss {loss.mean():.5f}  "
            f"{rate:,.0f} steps/s  ETA {_duration((self.steps - step) / rate if rate > 0 else math.inf)}  "
            f"{now - self.start:.1f}s"
        )


def _write_whole(path: Path, write: Callable) -> None:
    """write(file) into a temporary file beside `path`, then rename it: no half-written file looks complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run(cfg: ToyConfig, out_dir: str | Path, log=_say, stop: Callable[[], int | None] | None = None) -> dict:
    """Train, analyse and save one experiment; returns the metrics written to metrics.json.

    stop(): the number of a signal asking the run to stop, or None; polled after each compiled call but the
    last. A stop raises Stopped, saying what was kept.
    """
    check(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = settings(cfg)
    n_seeds = cfg.train.n_seeds
    task = Task(
        cfg.model.kind,
        cfg.model.n_features,
        cfg.model.n_hidden,
        cfg.train.batch_size,
        cfg.data.correlated_pairs,
        cfg.data.anticorrelated_pairs,
        cfg.data.rng,
    )
    log(
        f"{cfg.experiment}: {len(grid)} settings × {n_seeds} seeds = {len(grid) * n_seeds} instances of the "
        f"{cfg.model.kind} model (n={cfg.model.n_features}, m={cfg.model.n_hidden}), {cfg.train.steps} steps"
    )
    has_theory = _has_theory(cfg, grid)
    init = None
    if cfg.train.init == "permuted":
        init = models.permuted_init(
            jax.random.key(cfg.seed), cfg.model.kind, n_seeds, len(grid), cfg.model.n_features, cfg.model.n_hidden
        )

    report = Progress(cfg.train.steps, log)

    def progress(step: int, loss: np.ndarray) -> None:
        report(step, loss)
        signum = stop() if stop is not None and step < cfg.train.steps else None  # trained: finish the run
        if signum:
            raise Stopped(
                f"stopped by {_signal_name(signum)} at step {step} of {cfg.train.steps}: nothing saved for this run; "
                "run the same command again to start it over",
                signum,
            )

    result = train(
        task,
        np.tile(grid.feature_probability, n_seeds),
        np.tile(grid.importance, (n_seeds, 1)),
        seed=cfg.seed,
        steps=cfg.train.steps,
        lr=cfg.train.lr,
        schedule=cfg.train.schedule,
        weight_decay=cfg.train.weight_decay,
        steps_per_call=cfg.train.steps_per_call,
        eval_batches=cfg.train.eval_batches,
        on_progress=progress,
        init=init,
    )
    eval_loss_per_seed = result.eval_loss.reshape(n_seeds, len(grid))
    loss_per_seed = eval_loss_per_seed
    if has_theory:
        loss_per_seed = theory.expected_losses(
            result.params["W"],
            result.params["b"],
            np.tile(grid.feature_probability, n_seeds),
            np.tile(grid.importance, (n_seeds, 1)),
        ).reshape(n_seeds, len(grid))
    best = loss_per_seed.argmin(axis=0)  # [S]
    chosen = best * len(grid) + np.arange(len(grid))  # instance index of each setting's best seed
    params = {name: value[chosen] for name, value in result.params.items()}
    loss_curve = result.loss_curve[:, chosen]

    arrays = dict(
        params,
        loss=loss_per_seed.min(axis=0),
        feature_probability=grid.feature_probability,
        importance=grid.importance,
        loss_per_seed=loss_per_seed,
        eval_loss_per_seed=eval_loss_per_seed,
        best_seed=best,
        loss_curve=loss_curve,
        curve_steps=result.curve_steps,
    )
    if grid.relative_importance is not None:
        arrays["relative_importance"] = grid.relative_importance
    _write_whole(out / "results.npz", lambda f: np.savez(f, **arrays))

    theory_start = time.perf_counter()
    theories = None
    if has_theory:
        solve = theory.PhaseTheory(cfg.model.n_features, cfg.model.n_hidden)
        log(f"theory: {len(solve.candidates)} candidate solutions per setting")
        theories = [solve(grid.feature_probability[s], grid.importance[s]) for s in range(len(grid))]
    metrics = {
        "experiment": cfg.experiment,
        "config": to_dict(cfg),
        "n_settings": len(grid),
        "n_instances": len(grid) * n_seeds,
        "seconds": result.seconds,
        "steps_per_s": cfg.train.steps / result.seconds,
        "seed_selection": "expected loss" if has_theory else "held-out loss",
        "settings": [
            analyse_setting(cfg, grid, params, arrays["loss"], s, theories and theories[s]) for s in range(len(grid))
        ],
    }
    if has_theory:
        metrics["theory_seconds"] = time.perf_counter() - theory_start
        metrics["phase_agreement"] = phase_agreement(metrics["settings"])
    if cfg.figures:
        metrics["figures"] = [
            p.name for p in _figures(cfg, grid, params, loss_curve, result.curve_steps, out, theories)
        ]
    _write_whole(out / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    log(summary(metrics))
    return metrics


def _has_theory(cfg: ToyConfig, grid: Settings) -> bool:
    """Whether theory.py covers this run: a phase diagram of the ReLU model at one of its (n, m)."""
    return (
        grid.relative_importance is not None
        and cfg.model.kind == "relu"
        and (cfg.model.n_features, cfg.model.n_hidden) in theory.CANDIDATES
    )


def analyse_setting(
    cfg: ToyConfig, grid: Settings, params: dict, loss: np.ndarray, s: int, phase_theory: theory.Theory | None = None
) -> dict:
    """The analysis of setting s's best instance (and the theory there, if given) as plain JSON values."""
    W = (params["W1"] if cfg.model.kind == "abs" else params["W"])[s]
    is_represented = analysis.represented(W)
    entry = {
        "feature_probability": float(grid.feature_probability[s]),
        "loss": float(loss[s]),
        "n_represented": int(is_represented.sum()),
        "represented": np.flatnonzero(is_represented).tolist(),
        "dimensions_per_feature": analysis.dimensions_per_feature(W),
        "feature_dimensionality": analysis.feature_dimensionality(W).round(4).tolist(),
        "feature_norms": analysis.feature_norms(W).round(4).tolist(),
        "superposition": analysis.superposition(W).round(4).tolist(),
    }
    if grid.relative_importance is not None:
        entry["relative_importance"] = float(grid.relative_importance[s])
        entry["phase"] = analysis.PHASES[analysis.phase(W)]
    if phase_theory is not None:
        entry["theory"] = {
            "phase": analysis.PHASES[phase_theory.phase],
            "margin": round(phase_theory.margin, 4),
            "clear": phase_theory.clear,
            "losses": {c.name: c.loss for c in phase_theory.solutions},
        }
        entry["agrees"] = entry["phase"] == entry["theory"]["phase"]
    if cfg.model.n_hidden == 2 and cfg.model.kind != "abs":
        entry["geometry"] = analysis.geometry_2d(W)
    if cfg.model.kind in ("privileged", "abs"):
        mono = analysis.neuron_monosemanticity(W)
        entry["neuron_monosemanticity"] = mono.round(4).tolist()
        entry["n_monosemantic_neurons"] = int((mono > 0.9).sum())
    n_pairs = cfg.data.correlated_pairs + cfg.data.anticorrelated_pairs
    if n_pairs:
        entry["pair_cosines"] = [round(c, 4) for c in analysis.pair_cosines(W, n_pairs)]
    return entry


def phase_agreement(entries: list[dict]) -> dict:
    """Share of settings whose trained phase is the theory's, over all and over the clear ones (margin > 10%)."""
    clear = [e for e in entries if e["theory"]["clear"]]
    return {
        "all": float(np.mean([e["agrees"] for e in entries])),
        "clear": float(np.mean([e["agrees"] for e in clear])) if clear else 1.0,
        "n_settings": len(entries),
        "n_clear": len(clear),
        "disagreements_at_clear": [
            f"p={e['feature_probability']:.4g}, I={e['relative_importance']:.4g}" for e in clear if not e["agrees"]
        ],
    }


def summary(metrics: dict) -> str:
    """One line per setting: what the best instance represents."""
    head = (
        f"{metrics['experiment']}: {metrics['n_instances']} instances in {metrics['seconds']:.1f}s "
        f"({metrics['steps_per_s']:.0f} steps/s)"
    )
    lines = [head]
    for s in metrics["settings"]:
        extra = s.get("phase") or (s.get("geometry") or {}).get("label", "")
        if "theory" in s:
            extra += f" (theory: {s['theory']['phase']}, margin {s['theory']['margin']:.2f})"
        importance = f"I={s['relative_importance']:<7.3g}" if "relative_importance" in s else ""
        lines.append(
            f"  p={s['feature_probability']:<8.3g} {importance}loss={s['loss']:.3e} "
            f"represented={s['n_represented']:>3} D*={s['dimensions_per_feature']:.3f} {extra}"
        )
    if "phase_agreement" in metrics:
        agreement = metrics["phase_agreement"]
        lines.append(
            f"trained phase = theory's at {agreement['all']:.1%} of the settings, at {agreement['clear']:.1%} "
            f"of the {agreement['n_clear']} clear ones (margin > {theory.CLEAR_MARGIN:.0%}); theory took "
            f"{metrics['theory_seconds']:.1f}s"
        )
    return "\n".join(lines)


def _shown(n_settings: int) -> np.ndarray:
    """At most MAX_PANELS settings, evenly spread."""
    return np.unique(np.linspace(0, n_settings - 1, min(n_settings, MAX_PANELS)).round().astype(int))


def _figures(
    cfg: ToyConfig,
    grid: Settings,
    params: dict,
    loss_curve,
    curve_steps,
    out: Path,
    theories: list[theory.Theory] | None = None,
) -> list[Path]:
    """The paper's figures that apply to this run; the phase diagram beside the theory's when given."""
    from toy_models import figures  # matplotlib loads only when figures are drawn

    W = params["W1"] if cfg.model.kind == "abs" else params["W"]
    written = [figures.plot_loss_curves(curve_steps, loss_curve, grid.labels, out / "loss.png")]
    if grid.relative_importance is not None:
        phases = np.array([analysis.phase(w) for w in W])
        theory_phases = None if theories is None else np.array([t.phase for t in theories])
        clear = None if theories is None else np.array([t.clear for t in theories])
        written.append(
            figures.plot_phase(
                grid.feature_probability,
                grid.relative_importance,
                phases,
                out / "phase.png",
                title=f"n={cfg.model.n_features}, m={cfg.model.n_hidden}",
                theory=theory_phases,
                clear=clear,
            )
        )
        return written
    shown = _shown(len(grid))
    labels = [grid.labels[s] for s in shown]
    if cfg.model.kind != "abs":
        written.append(figures.plot_wtw(W[shown], labels, out / "wtw.png"))
    if cfg.model.n_hidden == 2 and cfg.model.kind != "abs":
        written.append(figures.plot_arrows_2d(W[shown], labels, out / "arrows.png", importance=grid.importance[shown]))
    if cfg.model.kind in ("privileged", "abs"):
        written.append(figures.plot_neurons(W[shown], labels, out / "neurons.png"))
    if len(grid) >= 3:
        written.append(
            figures.plot_dimensionality(
                grid.feature_probability,
                np.array([analysis.dimensions_per_feature(w) for w in W]),
                np.stack([analysis.feature_dimensionality(w) for w in W]),
                out / "dimensionality.png",
                represented=np.stack([analysis.represented(w) for w in W]),
            )
        )
    return written
