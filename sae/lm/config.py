"""Typed config schemas of `lm-train` (LMTrainConfig); `check_train` rejects impossible values with a
`ConfigError` naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae.config import CorpusConfig, LoggerConfig
from sae.errors import positive, require

TOKENIZERS = ("bytes", "bpe")


@dataclass
class LMModelConfig:
    """A GPT-2-layout decoder (sae/models/gpt2.py, ReLU MLP): Bricken et al. 2023's one-layer model, scaled down."""

    n_layers: int = 1
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512  # ReLU MLP neurons (the site `mlp_post` has this width)
    n_ctx: int = 128  # context length in tokens


@dataclass
class LMCorpusConfig(CorpusConfig):
    """lm-train's corpus and the tokenizer it trains on it."""

    tokenizer: str = "bpe"  # bpe (byte-level, trained on the training files) | bytes (256 bytes + end-of-text)
    bpe_vocab_size: int = 1024  # bpe only: end-of-text + 256 bytes + merges


@dataclass
class LMOptimConfig:
    """AdamW with linear warm-up and cosine decay to min_lr_fraction·lr."""

    lr: float = 3e-3
    min_lr_fraction: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1  # decoupled (AdamW), on ≥ 2-D weights only (not biases or LayerNorm scales)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global norm; null disables


@dataclass
class LMTrainerConfig:
    steps: int = 1000
    batch_size: int = 64  # sequences of model.n_ctx tokens per step
    steps_per_call: int = 25  # optimizer steps per jitted call (lax.scan)
    log_every: int = 100  # steps between train-loss lines (rounded up to whole calls)
    eval_every: int = 250  # steps between validation losses (rounded up to whole calls)
    eval_sequences: int = 256  # validation windows of n_ctx tokens per evaluation (fixed set)
    checkpoint_every: int = 500  # steps between orbax checkpoints (rounded up to whole calls; one also at the end)
    keep_checkpoints: int = 2  # the most recent checkpoints kept
    samples: int = 3  # samples printed and saved at the end
    sample_tokens: int = 200
    temperature: float = 0.8  # the first sample is greedy, the rest at this temperature


@dataclass
class LMTrainConfig:
    model: LMModelConfig = field(default_factory=LMModelConfig)
    corpus: LMCorpusConfig = field(default_factory=LMCorpusConfig)
    optim: LMOptimConfig = field(default_factory=LMOptimConfig)
    trainer: LMTrainerConfig = field(default_factory=LMTrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # metrics.jsonl is always written
    seed: int = 0


def check_train(cfg: LMTrainConfig) -> None:
    """Reject impossible lm-train values before anything runs. Raises ConfigError naming the field."""
    m, c, o, t = cfg.model, cfg.corpus, cfg.optim, cfg.trainer
    for key in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx"):
        positive(getattr(m, key), f"model.{key}")
    require(m.d_model % m.n_heads == 0, f"model.d_model={m.d_model} must divide by model.n_heads={m.n_heads}")
    require(0 < c.val_fraction < 1, f"corpus.val_fraction={c.val_fraction} must be in (0, 1)")
    require(c.tokenizer in TOKENIZERS, f"corpus.tokenizer={c.tokenizer!r} is not one of {list(TOKENIZERS)}")
    require(
        c.tokenizer != "bpe" or c.bpe_vocab_size > 257,
        f"corpus.bpe_vocab_size={c.bpe_vocab_size} must be > 257 (256 bytes + end-of-file + merges)",
    )
    positive(o.lr, "optim.lr")
    require(0 <= o.min_lr_fraction <= 1, f"optim.min_lr_fraction={o.min_lr_fraction} must be in [0, 1]")
    require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be ≥ 0")
    require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be ≥ 0")
    for key in ("beta1", "beta2"):
        require(0 <= getattr(o, key) < 1, f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    positive(o.eps, "optim.eps")
    if o.grad_clip is not None:
        positive(o.grad_clip, "optim.grad_clip")
    for key in (
        "steps",
        "batch_size",
        "steps_per_call",
        "log_every",
        "eval_every",
        "eval_sequences",
        "checkpoint_every",
        "sample_tokens",
    ):
        positive(getattr(t, key), f"trainer.{key}")
    positive(t.keep_checkpoints, "trainer.keep_checkpoints")
    require(t.samples >= 0, f"trainer.samples={t.samples} must be ≥ 0")
    positive(t.temperature, "trainer.temperature")
    cfg.logger.check()
