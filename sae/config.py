"""Typed schemas of a run's settings, and the checks on their values.

The schemas of the parts that vary (an SAE family, a data source) live beside their code and check
their own values (`check()`); `sae.cli` registers every schema with Hydra, so a misspelt key or a wrong
type fails when the config is composed. The same dataclasses drive a run from a notebook without Hydra;
their defaults are the only defaults (conf/ files select schemas and override only what really differs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from omegaconf import MISSING

from sae.architectures import FAMILIES
from sae.errors import fraction, positive, require

# --- optimiser, trainer, mesh, sweep, checkpoints ------------------------------------------------------


@dataclass
class OptimConfig:
    lr: float | None = None  # None: 2e-4/√(d_sae/2¹⁴) for the TopK family, 1e-3 otherwise
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_fraction: float = 0.01  # linear lr warm-up over this fraction of steps
    decay_fraction: float = 0.2  # linear lr decay to 0 over this final fraction of steps
    grad_clip: float | None = 1.0  # global-norm clipping; None disables
    sparsity_warmup_fraction: float = 0.05  # λ warmed up linearly over this fraction of steps


@dataclass
class MeshConfig:
    """Devices as data × model (see sae/parallel.py); data null: every device not used by model."""

    data: int | None = None
    model: int = 1  # devices the latents (d_sae) are split over
    distributed: bool = False  # call jax.distributed.initialize (multi-host); the fields below or the environment
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclass
class SweepConfig:
    """Several SAEs trained in one pass on the same batches, one per value (sae/training/sweep.py)."""

    key: str | None = None  # sae.<field>: a field the family can sweep (its `sweep`: sae.k, sae.l1_coefficient, ...)
    values: list[float] = field(default_factory=list)


def sweep_keys() -> dict[str, list[str]]:
    """{"sae.<field>": [families that can sweep it]}, from each family's `sweep`."""
    keys: dict[str, list[str]] = {}
    for name, family in FAMILIES.items():
        for key in family.sweep:
            keys.setdefault(f"sae.{key}", []).append(name)
    return keys


# What the train step reports (sae/training/step.py); the loss terms exist only for their families.
STEP_METRICS = ("loss", "mse_loss", "l1_loss", "auxk_loss", "l0_loss", "gate_aux_loss", "l0", "fvu", "dead_fraction")


@dataclass
class CheckpointConfig:
    """Orbax checkpoints under <run dir>/checkpoints (sae/checkpoint.py)."""

    every: int = 1000  # steps between checkpoints; one is also made at the end and on Ctrl-C or SIGTERM; 0: only those
    keep: int = 2  # the most recent checkpoints kept
    best_metric: str | None = "fvu"  # also keep the best checkpoint by this logged metric; null: the latest only
    best_mode: str = "min"  # min | max: whether a lower or a higher best_metric is better
    async_save: bool = True  # write in a background thread while training goes on


@dataclass
class TrainerConfig:
    total_tokens: int = 4_000_000
    batch_size: int = 4096
    log_every: int = 50  # steps between console / metrics.jsonl lines
    dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
    geometric_median_samples: int = 4096
    compute_dtype: str = "float32"  # float32 | bfloat16: the forward and backward passes
    param_dtype: str = "float32"  # float32 | bfloat16: parameters and Adam moments (float32 master weights)


# --- tracking ---------------------------------------------------------------------------------------

LOGGER_NAMES = ("wandb", "jsonl", "none")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class LoggerConfig:
    """`logger=` group: where a run's curves, histograms and feature dictionaries go (sae/tracking)."""

    name: str = "jsonl"  # wandb | jsonl | none
    project: str = "sae-jax"
    entity: str | None = None
    mode: str | None = None  # online | offline | disabled; null: online with an API key, else offline
    histogram_every: int = 500  # steps between feature-density / decoder-norm histograms
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    init_timeout: float = 30.0  # seconds an online wandb.init may take before the run goes offline

    def check(self) -> None:
        require(self.name in LOGGER_NAMES, f"logger.name={self.name!r} must be one of {'|'.join(LOGGER_NAMES)}")
        require(
            self.mode is None or self.mode in WANDB_MODES,
            f"logger.mode={self.mode!r} must be null or one of {'|'.join(WANDB_MODES)}",
        )
        require(isinstance(self.project, str) and bool(self.project.strip()), "logger.project must be a non-empty name")
        require(
            isinstance(self.histogram_every, int) and self.histogram_every > 0,
            f"logger.histogram_every={self.histogram_every} must be a positive number of steps",
        )
        require(
            all(isinstance(t, str) and t for t in self.tags), f"logger.tags={list(self.tags)} must be non-empty strings"
        )
        require(
            self.init_timeout > 0 and math.isfinite(self.init_timeout),
            f"logger.init_timeout={self.init_timeout} must be a positive number of seconds",
        )


# --- sae-train ---------------------------------------------------------------------------------------


@dataclass
class Config:
    """`sae-train`: sae is a family's schema (sae/architectures/<name>.py), data a source's (sae/data/)."""

    sae: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # conf/logger: wandb | jsonl | none
    seed: int = 0
    resume: str | None = None  # a run dir, its checkpoints/ or one step's dir; null: the run dir's own, if any


def check(cfg: Config) -> None:
    """Reject impossible values before anything runs. Raises ConfigError naming the field."""
    sae, optim, trainer = cfg.sae, cfg.optim, cfg.trainer
    require(sae.name in FAMILIES, f"sae.name={sae.name!r} is not one of {list(FAMILIES)}")
    family = FAMILIES[sae.name]
    require(type(sae) is family.config, f"sae.name={sae.name!r} does not match its schema")
    sae.check()
    cfg.data.check()

    if optim.lr is not None:
        positive(optim.lr, "optim.lr")
    fraction(optim.beta1, "optim.beta1")
    fraction(optim.beta2, "optim.beta2")
    positive(optim.eps, "optim.eps")
    fraction(optim.warmup_fraction, "optim.warmup_fraction")
    fraction(optim.decay_fraction, "optim.decay_fraction")
    require(
        optim.warmup_fraction + optim.decay_fraction <= 1, "optim.warmup_fraction + optim.decay_fraction must be ≤ 1"
    )
    fraction(optim.sparsity_warmup_fraction, "optim.sparsity_warmup_fraction")
    if optim.grad_clip is not None:
        positive(optim.grad_clip, "optim.grad_clip")

    if cfg.sweep.key is not None:
        keys = sweep_keys()
        families = keys.get(cfg.sweep.key)
        require(families is not None, f"sweep.key={cfg.sweep.key!r} is not one of {sorted(keys)}")
        require(
            sae.name in families, f"sweep.key={cfg.sweep.key} applies to sae={'|'.join(families)}, not sae={sae.name}"
        )
        require(len(cfg.sweep.values) >= 1, "sweep.values must list at least one value")
        if cfg.sweep.key == "sae.k":
            require(
                all(float(v).is_integer() and 0 < v <= sae.d_sae for v in cfg.sweep.values),
                f"sweep.values={list(cfg.sweep.values)} must be integers k in 1..sae.d_sae={sae.d_sae}",
            )
        else:
            require(all(v >= 0 for v in cfg.sweep.values), f"sweep.values={list(cfg.sweep.values)} must be ≥ 0")
    positive(cfg.mesh.model, "mesh.model")
    if cfg.mesh.data is not None:
        positive(cfg.mesh.data, "mesh.data")
        require(
            trainer.batch_size % cfg.mesh.data == 0,
            f"trainer.batch_size={trainer.batch_size} must divide by mesh.data={cfg.mesh.data}",
        )
    require(sae.d_sae % cfg.mesh.model == 0, f"sae.d_sae={sae.d_sae} must divide by mesh.model={cfg.mesh.model}")
    positive(trainer.batch_size, "trainer.batch_size")
    require(
        trainer.total_tokens >= trainer.batch_size,
        f"trainer.total_tokens={trainer.total_tokens} must be ≥ trainer.batch_size={trainer.batch_size}",
    )
    positive(trainer.log_every, "trainer.log_every")
    positive(trainer.dead_tokens, "trainer.dead_tokens")
    positive(trainer.geometric_median_samples, "trainer.geometric_median_samples")
    cfg.logger.check()
    checkpoint = cfg.checkpoint
    require(checkpoint.every >= 0, f"checkpoint.every={checkpoint.every} must be ≥ 0 (0: only at the end)")
    require(checkpoint.keep >= 1, f"checkpoint.keep={checkpoint.keep} must be ≥ 1")
    require(
        checkpoint.best_mode in ("min", "max"), f"checkpoint.best_mode={checkpoint.best_mode!r} must be 'min' or 'max'"
    )
    require(
        checkpoint.best_metric is None or checkpoint.best_metric in STEP_METRICS,
        f"checkpoint.best_metric={checkpoint.best_metric!r} is not one of {list(STEP_METRICS)} (or null)",
    )
    for key in ("compute_dtype", "param_dtype"):
        require(
            getattr(trainer, key) in ("float32", "bfloat16"),
            f"trainer.{key}={getattr(trainer, key)!r} must be 'float32' or 'bfloat16'",
        )


# --- sae-cache ---------------------------------------------------------------------------------------

STORE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class CorpusConfig:
    """Text with no downloads: the Python standard library's own source by default (sae/lm/text.py)."""

    path: str | None = None  # a directory of text files, a .txt (paragraphs) or a .jsonl ("text"); null: stdlib
    pattern: str = "*.py"  # directory only: file-name glob, matched recursively under path
    exclude: list[str] = field(
        default_factory=lambda: ["site-packages", "dist-packages", "test", "tests", "idle_test"]
    )  # directory only: names (globs) of the folders and files skipped
    val_fraction: float = 0.05  # documents (by a hash of their id: path, or file:line) held out for validation
    header: str = ""  # a first line put before each document, {id} its id: '# Lib/{id}' gives '# Lib/json/decoder.py'


@dataclass
class CacheConfig:
    source: Any = MISSING  # a row source's schema (sae/data/): arrays | synthetic | toy | hf
    out: str = MISSING  # the store directory (relative to the current directory); several sites: one store each inside
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # the text a model source (source=hf) reads
    dtype: str = "float16"  # the store's dtype: float16, bfloat16 or float32
    shard_rows: int = 262144  # rows per shard file
    chunk_rows: int = 65536  # rows read or generated per step
    seed: int = 0


def check_cache(cfg: CacheConfig) -> None:
    """Reject impossible sae-cache values before anything is read or written. Raises ConfigError."""
    require(bool(cfg.out), "out must name the store directory")
    require(cfg.dtype in STORE_DTYPES, f"dtype={cfg.dtype!r} is not one of {list(STORE_DTYPES)}")
    require(cfg.shard_rows > 0, f"shard_rows={cfg.shard_rows} must be > 0")
    require(cfg.chunk_rows > 0, f"chunk_rows={cfg.chunk_rows} must be > 0")
    cfg.source.check()


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config (for cfg.json metadata and logs)."""
    return asdict(cfg)
