"""Typed config of `toy-train` (Hydra ConfigStore schema `toy_schema`) and the checks on its values.

A run trains one instance per setting and seed. The settings are the feature probabilities, or, when
`data.relative_importance` is given (phase diagrams), the grid of relative importance × probability.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from hydra.core.config_store import ConfigStore

from toy_models.data import RNG_KINDS
from toy_models.models import INITS, KINDS
from toy_models.train import SCHEDULES


class ToyConfigError(ValueError):
    """A user-facing configuration mistake; the message names the field and what was expected."""


@dataclass
class ToyModelConfig:
    kind: str = "relu"  # one of models.KINDS
    n_features: int = 5  # n
    n_hidden: int = 2  # m


@dataclass
class ToyDataConfig:
    feature_probability: list[float] = field(default_factory=lambda: [1.0])  # p = 1 − S, one setting each
    importance_decay: float = 1.0  # I_i = decay^i
    importance: list[float] = field(default_factory=list)  # explicit I_i (n_features values); overrides decay
    relative_importance: list[float] = field(default_factory=list)  # phase diagrams: the last feature's I
    correlated_pairs: int = 0  # features 0..2c−1 fire in pairs
    anticorrelated_pairs: int = 0  # the next 2a features: at most one of each pair fires
    rng: str = "hash"  # one of data.RNG_KINDS


@dataclass
class ToyTrainConfig:
    steps: int = 10_000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.01  # PyTorch AdamW's default
    schedule: str = "constant"  # constant | linear | cosine
    n_seeds: int = 1  # instances per setting; analysis keeps the lowest-loss one
    init: str = "normal"  # one of models.INITS: independent draws per seed, or permuted_init's variants
    steps_per_call: int = 1000  # optimiser steps per compiled call (lax.scan)
    eval_batches: int = 8  # held-out batches for the per-instance loss


@dataclass
class ToyConfig:
    experiment: str = "custom"  # set by the toy/ group: names the run and picks the figures
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    seed: int = 0
    figures: bool = True
    logger: Any = None  # the conf/logger group, used by the toy-train entry point (sae/cli.py), not here


def register() -> None:
    ConfigStore.instance().store(name="toy_schema", node=ToyConfig)


def to_dict(cfg: ToyConfig) -> dict:
    return asdict(cfg)


def _fail(field_name: str, value, expected: str) -> None:
    raise ToyConfigError(f"{field_name}={value!r}: expected {expected}")


def check(cfg: ToyConfig) -> None:
    """Reject impossible values with a message naming the field."""
    model, data, train = cfg.model, cfg.data, cfg.train
    if model.kind not in KINDS:
        _fail("model.kind", model.kind, f"one of {list(KINDS)}")
    for name in ("n_features", "n_hidden"):
        if getattr(model, name) <= 0:
            _fail(f"model.{name}", getattr(model, name), "a positive integer")
    if not data.feature_probability:
        _fail("data.feature_probability", data.feature_probability, "a non-empty list of probabilities")
    for p in data.feature_probability:
        if not 0.0 < p <= 1.0:
            _fail("data.feature_probability", list(data.feature_probability), "every value in (0, 1]")
    if data.importance_decay <= 0:
        _fail("data.importance_decay", data.importance_decay, "a positive number")
    if data.importance and len(data.importance) != model.n_features:
        _fail("data.importance", list(data.importance), f"{model.n_features} values (one per model.n_features)")
    if any(i < 0 for i in data.importance):
        _fail("data.importance", list(data.importance), "non-negative values")
    if any(r <= 0 for r in data.relative_importance):
        _fail("data.relative_importance", list(data.relative_importance), "positive values")
    for name in ("correlated_pairs", "anticorrelated_pairs"):
        if getattr(data, name) < 0:
            _fail(f"data.{name}", getattr(data, name), "a non-negative integer")
    paired = 2 * (data.correlated_pairs + data.anticorrelated_pairs)
    if paired > model.n_features:
        _fail(
            "data.correlated_pairs + data.anticorrelated_pairs",
            data.correlated_pairs + data.anticorrelated_pairs,
            f"at most model.n_features / 2 = {model.n_features // 2}",
        )
    if data.anticorrelated_pairs and max(data.feature_probability) > 0.5:
        _fail(
            "data.feature_probability",
            list(data.feature_probability),
            "values ≤ 0.5 with anti-correlated pairs (a pair fires with probability 2p)",
        )
    if data.rng not in RNG_KINDS:
        _fail("data.rng", data.rng, f"one of {list(RNG_KINDS)}")
    for name in ("steps", "batch_size", "n_seeds", "steps_per_call", "eval_batches"):
        if getattr(train, name) <= 0:
            _fail(f"train.{name}", getattr(train, name), "a positive integer")
    if train.lr <= 0:
        _fail("train.lr", train.lr, "a positive number")
    if train.weight_decay < 0:
        _fail("train.weight_decay", train.weight_decay, "a non-negative number")
    if train.schedule not in SCHEDULES:
        _fail("train.schedule", train.schedule, f"one of {list(SCHEDULES)}")
    if train.init not in INITS:
        _fail("train.init", train.init, f"one of {list(INITS)}")
    if train.init == "permuted" and model.kind == "abs":
        _fail("train.init", train.init, "'normal' for the abs model (permuted_init needs a single W)")


@dataclass(frozen=True)
class Settings:
    """The settings of a run, one instance each (before seeds): arrays with a leading [n_settings] axis."""

    feature_probability: np.ndarray  # [S]
    importance: np.ndarray  # [S, n]
    relative_importance: np.ndarray | None  # [S] for phase diagrams, else None

    @property
    def labels(self) -> list[str]:
        if self.relative_importance is None:
            return [f"p={p:.3g}" for p in self.feature_probability]
        return [f"p={p:.3g}, I={r:.3g}" for p, r in zip(self.feature_probability, self.relative_importance)]

    def __len__(self) -> int:
        return len(self.feature_probability)


def settings(cfg: ToyConfig) -> Settings:
    """Expand the data config into per-setting arrays; phase grids are importance-major."""
    n = cfg.model.n_features
    base = (
        np.asarray(cfg.data.importance, np.float64)
        if cfg.data.importance
        else cfg.data.importance_decay ** np.arange(n)
    )
    probs = np.asarray(cfg.data.feature_probability, np.float64)
    if not cfg.data.relative_importance:
        return Settings(probs, np.tile(base, (len(probs), 1)), None)
    rel = np.repeat(np.asarray(cfg.data.relative_importance, np.float64), len(probs))
    importance = np.tile(base, (len(rel), 1))
    importance[:, -1] = rel
    return Settings(np.tile(probs, len(cfg.data.relative_importance)), importance, rel)
