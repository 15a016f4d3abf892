"""The `sae-inspect` config schema (`inspect_schema`, registered by sae/cli.py) and its value checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from sae.errors import require


@dataclass
class InspectConfig:
    """What `sae-inspect run=OUT` reads, how much, and what it keeps per feature."""

    run: str = MISSING  # a sae-train run directory (sae/ + metrics.json)
    out: str | None = None  # where to write; null: RUN/inspect
    rows: int | None = None  # rows to pass; null: the whole store / .npy, or 262144 generated rows (synthetic, toy)
    data: dict[str, Any] = field(default_factory=dict)  # overrides of the run's data config, e.g. data.path=STORE
    batch_size: int = 4096  # rows per jitted step
    top_k: int = 16  # highest activations kept per feature
    n_random: int = 16  # random firing examples kept per feature (for the lower quantiles)
    random_stride: int = 4  # random examples are drawn from every random_stride-th row of each batch
    bins_per_octave: int = 4  # activation histogram: each factor of 2 split in this many bins (1, 2, 4, 8, 16)
    hist_min: float = 6.103515625e-05  # 2^-14: the histogram's range (values outside go to its end bins)
    hist_max: float = 1024.0
    context_before: int = 8  # tokens shown before an example's token (stores with token ids)
    context_after: int = 3
    n_neighbours: int = 8  # most similar decoder rows listed per feature
    ultra_low_density: float = 1e-5  # alive features firing on fewer than this fraction of rows are listed
    vocab: str | None = None  # token strings: .json list / {id: str} or .txt (one per line); null: STORE/vocab.json
    labels: str | None = None  # feature labels: .json {feature: label}; null: RUN/labels.json if present
    page_size: int = 100  # rows per page of the browser's feature list
    chunk_features: int = 64  # features per lazily loaded .js file of the browser
    seed: int = 0  # the random examples' hash and generated rows


def check(cfg: InspectConfig) -> None:
    """Reject impossible values before anything is read. Raises ConfigError naming the field."""
    require(bool(cfg.run), "run must name a sae-train output directory")
    require(cfg.rows is None or cfg.rows > 0, f"rows={cfg.rows} must be null or > 0")
    for key in ("batch_size", "top_k", "n_random", "random_stride", "n_neighbours", "page_size", "chunk_features"):
        require(getattr(cfg, key) > 0, f"{key}={getattr(cfg, key)} must be > 0")
    require(
        cfg.batch_size % cfg.random_stride == 0,
        f"batch_size={cfg.batch_size} must be a multiple of random_stride={cfg.random_stride}",
    )
    require(cfg.bins_per_octave in (1, 2, 4, 8, 16), f"bins_per_octave={cfg.bins_per_octave} must be 1, 2, 4, 8 or 16")
    require(
        0 < cfg.hist_min < cfg.hist_max < 3e38,
        f"hist_min={cfg.hist_min}, hist_max={cfg.hist_max} must be 0 < min < max",
    )
    require(
        cfg.context_before >= 0 and cfg.context_after >= 0,
        f"context_before={cfg.context_before}, context_after={cfg.context_after} must be ≥ 0",
    )
    require(0 <= cfg.ultra_low_density < 1, f"ultra_low_density={cfg.ultra_low_density} must be in [0, 1)")
