"""Typed config schemas (Hydra ConfigStore) and the checks on their values.

Each group's yaml in conf/ extends one of these dataclasses, so a misspelt key or a wrong type fails
when Hydra composes the config; `check` then rejects impossible values with a `ConfigError` that
names the field. The same dataclasses drive a run from a notebook without Hydra.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sae.lm.config import LMSourceConfig


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the field and what was expected."""


# --- sae -----------------------------------------------------------------------------------------


@dataclass
class SAEConfig:
    name: str = MISSING
    d_sae: int = 512
    normalize_activations: bool = False  # scale inputs so E‖x‖ = √d_in (folded into weights at export)


@dataclass
class ReLUConfig(SAEConfig):
    l1_coefficient: float = 1.0


@dataclass
class GatedConfig(ReLUConfig):
    pass


@dataclass
class TopKConfig(SAEConfig):
    k: int = 6
    k_aux: int | None = None  # None: d_in // 2 (Gao et al.)
    aux_coefficient: float = 1.0 / 32


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_ema_decay: float = 0.99  # SAELens's topk_threshold_lr = 0.01


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    prefixes: list[int] = field(default_factory=list)  # empty: d_sae/16, /8, /4, /2, d_sae


@dataclass
class JumpReLUConfig(SAEConfig):
    l0_coefficient: float = 1.0
    threshold_init: float = 0.001
    bandwidth: float = 0.001


SAE_SCHEMAS = {
    "relu": ReLUConfig,
    "relu_april": ReLUConfig,
    "topk": TopKConfig,
    "batchtopk": BatchTopKConfig,
    "jumprelu": JumpReLUConfig,
    "gated": GatedConfig,
    "matryoshka": MatryoshkaConfig,
}
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")


# --- data ----------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = MISSING
    eval_tokens: int = 65536  # held-out tokens for the final evaluation


@dataclass
class SyntheticConfig(DataConfig):
    """Sparse non-negative combinations of ground-truth unit directions (see sae/data/synthetic.py)."""

    d_in: int = 64
    n_features: int = 256
    mean_active: float = 6.0  # expected number of active features per token
    probability_decay: float = 0.5  # feature i fires with probability ∝ (i + 1)^(−decay)
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.25
    n_correlated_groups: int = 0
    group_size: int = 4
    group_correlation: float = 0.0  # 0..1: how often a group's members fire together
    noise_std: float = 0.0


@dataclass
class ArraysConfig(DataConfig):
    path: str = MISSING  # a [n_tokens, d_in] float16/float32 .npy file


@dataclass
class CachedConfig(DataConfig):
    """An activation store written by sae-cache (sae/data/store.py)."""

    path: str = MISSING  # the store directory (manifest.json + shards)
    mixing_rows: int = 1_048_576  # rows shuffled together (a window of whole shards; two windows are held in memory)
    verify: bool = True  # check each shard's checksum as it is loaded
    check_finite: bool = False  # also scan each loaded shard for NaN/Inf rows (sae-cache already refused them)


@dataclass
class ToyRunConfig(DataConfig):
    """Hidden activations of a trained toy model (a `toy-train` run directory)."""

    run: str = MISSING  # the toy-train output directory (results.npz + metrics.json)
    setting: int | None = None  # which setting's best model; toy-sae trains one SAE per setting when None


# --- optimiser and trainer --------------------------------------------------------------------------


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

    key: str | None = None  # sae.k (topk), sae.l1_coefficient (relu, relu_april, gated), sae.l0_coefficient (jumprelu)
    values: list[float] = field(default_factory=list)


SWEEP_KEYS = {"sae.k": ("topk",), "sae.l1_coefficient": ("relu", "relu_april", "gated"),
              "sae.l0_coefficient": ("jumprelu",)}


# What the train step reports (sae/training/step.py); the loss terms exist only for their families.
STEP_METRICS = ("loss", "mse_loss", "l1_loss", "auxk_loss", "l0_loss", "gate_aux_loss", "l0", "fvu", "dead_fraction")


@dataclass
class CheckpointConfig:
    """Orbax checkpoints under <run dir>/checkpoints (sae/checkpoint.py)."""

    every: int = 1000  # steps between checkpoints; one is also made at the end and on SIGTERM; 0: only those
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


# --- sae-cache: a source written into an activation store (sae/cache.py) ------------------------------


@dataclass
class ArraysSourceConfig:
    name: str = MISSING
    path: str = MISSING  # a [n, d_in] .npy, a .safetensors file, or a directory / glob of .npy files
    tensor: str | None = None  # the tensor of a .safetensors file (may be omitted when it holds one)


@dataclass
class SyntheticSourceConfig(SyntheticConfig):
    n_rows: int = 1_000_000  # eval_tokens (inherited) is unused by sae-cache


@dataclass
class ToySourceConfig:
    name: str = MISSING
    run: str = MISSING  # the toy-train output directory
    setting: int = 0  # which setting's model
    n_rows: int = 1_000_000


SOURCE_SCHEMAS = {"arrays": ArraysSourceConfig, "synthetic": SyntheticSourceConfig, "toy": ToySourceConfig,
                  "lm": LMSourceConfig}
STORE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class CacheConfig:
    source: Any = MISSING
    out: str = MISSING  # the store directory (relative to the current directory)
    dtype: str = "float16"  # the store's dtype: float16, bfloat16 or float32
    shard_rows: int = 262144  # rows per shard file
    chunk_rows: int = 65536  # rows read or generated per step
    seed: int = 0


# --- sae-train ---------------------------------------------------------------------------------------


def _default_logger():
    from sae.tracking import LoggerConfig  # sae.tracking imports this module

    return LoggerConfig()


@dataclass
class Config:
    sae: Any = MISSING
    data: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: Any = field(default_factory=_default_logger)  # conf/logger: wandb | jsonl | none (sae/tracking.py)
    seed: int = 0
    resume: str | None = None  # a run dir, its checkpoints/ or one step's dir; null: the run dir's own, if any


def register() -> None:
    """Register the schemas so conf/**.yaml can extend them (`defaults: [<name>_schema]`)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="mesh", name="mesh_schema", node=MeshConfig)
    for name, schema in SAE_SCHEMAS.items():
        cs.store(group="sae", name=f"{name}_schema", node=schema)
    cs.store(group="data", name="synthetic_schema", node=SyntheticConfig)
    cs.store(group="data", name="arrays_schema", node=ArraysConfig)
    cs.store(group="data", name="toy_schema", node=ToyRunConfig)
    cs.store(name="cache_schema", node=CacheConfig)
    for name, schema in SOURCE_SCHEMAS.items():
        cs.store(group="source", name=f"{name}_schema", node=schema)
    cs.store(group="data", name="cached_schema", node=CachedConfig)
    from sae.tracking import register_schemas  # sae.tracking imports this module

    register_schemas(cs)


# --- value checks ------------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(value: float, key: str) -> None:
    _require(value is not None and value > 0 and math.isfinite(value), f"{key}={value} must be a positive number")


def _fraction(value: float, key: str) -> None:
    _require(0 <= value <= 1, f"{key}={value} must be a fraction in [0, 1]")


def check(cfg: Config) -> None:
    """Reject impossible values before anything runs. Raises ConfigError naming the field."""
    sae, data, optim, trainer = cfg.sae, cfg.data, cfg.optim, cfg.trainer
    _require(sae.name in SAE_SCHEMAS, f"sae.name={sae.name!r} is not one of {sorted(SAE_SCHEMAS)}")
    _require(type(sae) is SAE_SCHEMAS[sae.name], f"sae.name={sae.name!r} does not match its schema")
    _positive(sae.d_sae, "sae.d_sae")
    for key in ("l1_coefficient", "l0_coefficient"):
        if hasattr(sae, key):
            _require(getattr(sae, key) >= 0, f"sae.{key}={getattr(sae, key)} must be ≥ 0")
    if isinstance(sae, TopKConfig):
        _require(0 < sae.k <= sae.d_sae, f"sae.k={sae.k} must be in 1..sae.d_sae={sae.d_sae}")
        _require(sae.k_aux is None or 0 < sae.k_aux <= sae.d_sae,
                 f"sae.k_aux={sae.k_aux} must be null or in 1..sae.d_sae={sae.d_sae}")
        _require(sae.aux_coefficient >= 0, f"sae.aux_coefficient={sae.aux_coefficient} must be ≥ 0")
    if isinstance(sae, BatchTopKConfig):
        _require(0 <= sae.threshold_ema_decay < 1,
                 f"sae.threshold_ema_decay={sae.threshold_ema_decay} must be in [0, 1)")
    if isinstance(sae, MatryoshkaConfig):
        p = list(sae.prefixes)
        _require(all(a < b for a, b in zip([0] + p, p)) and (not p or p[-1] <= sae.d_sae),
                 f"sae.prefixes={p} must be strictly increasing positive sizes ≤ sae.d_sae={sae.d_sae}")
    if isinstance(sae, JumpReLUConfig):
        _positive(sae.bandwidth, "sae.bandwidth")
        _positive(sae.threshold_init, "sae.threshold_init")

    _require(data.eval_tokens > 0, f"data.eval_tokens={data.eval_tokens} must be > 0")
    if isinstance(data, SyntheticConfig):
        _check_synthetic(data, "data")

    if isinstance(data, CachedConfig):
        _positive(data.mixing_rows, "data.mixing_rows")
    if isinstance(data, ToyRunConfig):
        _require(data.setting is None or data.setting >= 0, f"data.setting={data.setting} must be ≥ 0")

    if optim.lr is not None:
        _positive(optim.lr, "optim.lr")
    _fraction(optim.beta1, "optim.beta1")
    _fraction(optim.beta2, "optim.beta2")
    _positive(optim.eps, "optim.eps")
    _fraction(optim.warmup_fraction, "optim.warmup_fraction")
    _fraction(optim.decay_fraction, "optim.decay_fraction")
    _require(optim.warmup_fraction + optim.decay_fraction <= 1,
             "optim.warmup_fraction + optim.decay_fraction must be ≤ 1")
    _fraction(optim.sparsity_warmup_fraction, "optim.sparsity_warmup_fraction")
    if optim.grad_clip is not None:
        _positive(optim.grad_clip, "optim.grad_clip")

    if cfg.sweep.key is not None:
        families = SWEEP_KEYS.get(cfg.sweep.key)
        _require(families is not None, f"sweep.key={cfg.sweep.key!r} is not one of {sorted(SWEEP_KEYS)}")
        _require(sae.name in families, f"sweep.key={cfg.sweep.key} applies to sae={'|'.join(families)}, "
                                       f"not sae={sae.name}")
        _require(len(cfg.sweep.values) >= 1, "sweep.values must list at least one value")
        if cfg.sweep.key == "sae.k":
            _require(all(float(v).is_integer() and 0 < v <= sae.d_sae for v in cfg.sweep.values),
                     f"sweep.values={list(cfg.sweep.values)} must be integers k in 1..sae.d_sae={sae.d_sae}")
        else:
            _require(all(v >= 0 for v in cfg.sweep.values), f"sweep.values={list(cfg.sweep.values)} must be ≥ 0")
    _positive(cfg.mesh.model, "mesh.model")
    if cfg.mesh.data is not None:
        _positive(cfg.mesh.data, "mesh.data")
        _require(trainer.batch_size % cfg.mesh.data == 0,
                 f"trainer.batch_size={trainer.batch_size} must divide by mesh.data={cfg.mesh.data}")
    _require(sae.d_sae % cfg.mesh.model == 0, f"sae.d_sae={sae.d_sae} must divide by mesh.model={cfg.mesh.model}")
    _positive(trainer.batch_size, "trainer.batch_size")
    _require(trainer.total_tokens >= trainer.batch_size,
             f"trainer.total_tokens={trainer.total_tokens} must be ≥ trainer.batch_size={trainer.batch_size}")
    _positive(trainer.log_every, "trainer.log_every")
    _positive(trainer.dead_tokens, "trainer.dead_tokens")
    _positive(trainer.geometric_median_samples, "trainer.geometric_median_samples")
    from sae.tracking import check_logger  # sae.tracking imports this module

    check_logger(cfg.logger)
    checkpoint = cfg.checkpoint
    _require(checkpoint.every >= 0, f"checkpoint.every={checkpoint.every} must be ≥ 0 (0: only at the end)")
    _require(checkpoint.keep >= 1, f"checkpoint.keep={checkpoint.keep} must be ≥ 1")
    _require(checkpoint.best_mode in ("min", "max"), f"checkpoint.best_mode={checkpoint.best_mode!r} must be 'min' or 'max'")
    _require(checkpoint.best_metric is None or checkpoint.best_metric in STEP_METRICS,
             f"checkpoint.best_metric={checkpoint.best_metric!r} is not one of {list(STEP_METRICS)} (or null)")
    for key in ("compute_dtype", "param_dtype"):
        _require(getattr(trainer, key) in ("float32", "bfloat16"),
                 f"trainer.{key}={getattr(trainer, key)!r} must be 'float32' or 'bfloat16'")


def _check_synthetic(c: SyntheticConfig, group: str) -> None:
    _positive(c.d_in, f"{group}.d_in")
    _positive(c.n_features, f"{group}.n_features")
    _require(0 < c.mean_active <= c.n_features,
             f"{group}.mean_active={c.mean_active} must be in (0, {group}.n_features={c.n_features}]")
    _require(c.probability_decay >= 0, f"{group}.probability_decay={c.probability_decay} must be ≥ 0")
    _require(c.magnitude_std >= 0, f"{group}.magnitude_std={c.magnitude_std} must be ≥ 0")
    _require(c.noise_std >= 0, f"{group}.noise_std={c.noise_std} must be ≥ 0")
    _fraction(c.group_correlation, f"{group}.group_correlation")
    _require(c.n_correlated_groups >= 0 and c.group_size > 0
             and c.n_correlated_groups * c.group_size <= c.n_features,
             f"{group}.n_correlated_groups={c.n_correlated_groups} × {group}.group_size={c.group_size} "
             f"must be ≤ {group}.n_features={c.n_features}")


def check_cache(cfg: CacheConfig) -> None:
    """Reject impossible sae-cache values before anything is read or written. Raises ConfigError."""
    source = cfg.source
    name = getattr(source, "name", None)
    _require(name in SOURCE_SCHEMAS, f"source.name={name!r} is not one of {sorted(SOURCE_SCHEMAS)}")
    _require(type(source) is SOURCE_SCHEMAS[name], f"source.name={name!r} does not match its schema")
    _require(bool(cfg.out), "out must name the store directory")
    _require(cfg.dtype in STORE_DTYPES, f"dtype={cfg.dtype!r} is not one of {list(STORE_DTYPES)}")
    _require(cfg.shard_rows > 0, f"shard_rows={cfg.shard_rows} must be > 0")
    _require(cfg.chunk_rows > 0, f"chunk_rows={cfg.chunk_rows} must be > 0")
    if isinstance(source, ArraysSourceConfig):
        _require(bool(source.path), "source.path must name a .npy / .safetensors file or a directory of .npy files")
    else:
        _require(source.n_rows > 0, f"source.n_rows={source.n_rows} must be > 0")
    if isinstance(source, SyntheticSourceConfig):
        _check_synthetic(source, "source")
    if isinstance(source, ToySourceConfig):
        _require(source.setting >= 0, f"source.setting={source.setting} must be ≥ 0")
    if isinstance(source, LMSourceConfig):
        _require(bool(source.checkpoint), "source.checkpoint must name an lm-train run directory")
        _require(source.split in ("train", "val"), f"source.split={source.split!r} is not one of ['train', 'val']")
        _require(source.batch_size > 0, f"source.batch_size={source.batch_size} must be > 0")


def default_lr(sae: SAEConfig) -> float:
    """Gao et al. / sparsify rule for the TopK family: 2e-4 / √(d_sae / 2¹⁴); 1e-3 otherwise."""
    if sae.name in TOPK_FAMILY:
        return 2e-4 / math.sqrt(sae.d_sae / 2**14)
    return 1e-3


def to_dict(cfg: Config) -> dict:
    """Plain dict of a config (for cfg.json metadata and logs)."""
    return asdict(cfg)
