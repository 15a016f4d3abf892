"""`lm-train`: train the transformer LM of sae/lm/model.py on a text corpus; `load_lm` reads a run back.

Next-token cross-entropy (nats/token), AdamW (Loshchilov & Hutter 2019) with linear warm-up and cosine
decay, global-norm clipping. Parameters and optimizer state are plain pytrees; `steps_per_call` steps
run as one `lax.scan` inside one `jax.jit` with the state donated. The batch of step s is
`random_windows` drawn from np.random.default_rng((seed, s)), so a run resumed from a checkpoint sees
the batches an uninterrupted run would.

Run directory: lm_config.json (model, tokenizer, corpus: all `load_lm` needs), checkpoints/<step>/
(orbax, sae/checkpoint.py), metrics.jsonl (train loss per log interval, val loss per evaluation),
metrics.json (final val/train loss, tokens, time), samples.txt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from sae.checkpoint import CHECKPOINTS, Checkpointer
from sae.config import CheckpointConfig
from sae.errors import ConfigError
from sae.lm.config import CorpusConfig, LMModelConfig, LMOptimConfig, LMTrainConfig, check_train
from sae.lm.model import TransformerLM, build, generate, token_losses
from sae.lm.text import (
    ByteTokenizer,
    Corpus,
    build_tokenizer,
    find_corpus,
    make_tokenizer,
    random_windows,
    tiled_windows,
)
from sae.tracking import make_tracker

LM_CONFIG = "lm_config.json"
SAMPLE_PROMPTS = ("def", "import", "class")  # no trailing space: BPE attaches a space to the next word


def make_optimizer(optim: LMOptimConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on a warm-up + cosine schedule (peak optim.lr, end optim.lr·min_lr_fraction), clipped first."""
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, warmup, max(steps, warmup + 1), optim.lr * optim.min_lr_fraction
    )
    adamw = optax.adamw(
        schedule,
        optim.beta1,
        optim.beta2,
        optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    tx = adamw if optim.grad_clip is None else optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return tx, schedule


def make_train_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """A jitted (params, opt_state, tokens [k, batch, n_ctx]) -> (params, opt_state, losses [k]): k AdamW steps."""

    def loss_fn(params, tokens):
        return token_losses(nnx.merge(graphdef, params)(tokens), tokens).mean()

    def step(carry, tokens):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_steps(params, opt_state, tokens):
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), tokens)
        return params, opt_state, losses

    return train_steps


def make_eval_loss(graphdef: nnx.GraphDef):
    """A jitted (params, tokens [batch, n_ctx]) -> summed next-token loss (nats) over the batch."""

    @jax.jit
    def eval_loss(params, tokens):
        return token_losses(nnx.merge(graphdef, params)(tokens), tokens).sum()

    return eval_loss


def mean_loss(eval_loss, params, windows: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss (nats/token) over windows [n, n_ctx], in batches."""
    total = sum(float(eval_loss(params, windows[i : i + batch_size])) for i in range(0, len(windows), batch_size))
    return total / (len(windows) * (windows.shape[1] - 1))


def step_batches(tokens: np.ndarray, n_ctx: int, batch_size: int, seed: int, first: int, k: int) -> np.ndarray:
    """The batches of steps first..first+k−1: [k, batch_size, n_ctx] int32, step s from default_rng((seed, s))."""
    return np.stack(
        [random_windows(tokens, n_ctx, batch_size, np.random.default_rng((seed, s))) for s in range(first, first + k)]
    )


def _corpus_record(cfg: CorpusConfig, corpus: Corpus) -> dict:
    """The corpus config with its root made absolute (what `corpus_of` needs), plus its description."""
    return {**dataclasses.asdict(cfg), "path": str(corpus.root), "description": corpus.describe()}


def corpus_of(lm_config: dict) -> Corpus:
    """The corpus an lm-train run used, from its lm_config.json record."""
    fields = {f.name for f in dataclasses.fields(CorpusConfig)}
    return find_corpus(CorpusConfig(**{k: v for k, v in lm_config["corpus"].items() if k in fields}))


def load_lm(run_dir: str | Path, step: int | None = None) -> tuple[TransformerLM, ByteTokenizer, dict]:
    """(model with the newest checkpoint's parameters, or those of `step`; tokenizer; lm_config.json) of a run."""
    run_dir = Path(run_dir).expanduser().absolute()
    path = run_dir / LM_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not an lm-train run directory: no {LM_CONFIG}")
    lm_config = json.loads(path.read_text())
    tokenizer = make_tokenizer(lm_config["tokenizer"])
    model = build(LMModelConfig(**lm_config["model"]), tokenizer.vocab_size)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    if not (run_dir / CHECKPOINTS).is_dir():
        raise FileNotFoundError(
            f"'{run_dir}' holds no {CHECKPOINTS}/ (was the lm-train run stopped before its first checkpoint?)"
        )
    absl = logging.getLogger("absl")
    level, _ = absl.level, absl.setLevel(logging.ERROR)  # orbax warns that a read-only manager will not save
    try:
        ckpt = Checkpointer(run_dir / CHECKPOINTS, CheckpointConfig(best_metric=None, async_save=False), read_only=True)
    finally:
        absl.setLevel(level)
    try:
        train = lm_config["train"]  # the optimizer state's structure is part of the checkpoint's
        tx, _ = make_optimizer(LMOptimConfig(**train["optim"]), train["trainer"]["steps"])
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": params, "opt": jax.eval_shape(tx.init, params)}
        )
        restored = ckpt.restore(abstract, lambda meta, where: None, step=step) if ckpt.steps() else None
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"'{run_dir / CHECKPOINTS}' holds no readable checkpoint")
    return nnx.merge(graphdef, restored.state["params"]), tokenizer, lm_config


def _sample_texts(
    model: TransformerLM, tokenizer: ByteTokenizer, n: int, n_tokens: int, temperature: float, seed: int
) -> list[str]:
    """n samples: the first greedy, the others at `temperature`, from prompts cycling over SAMPLE_PROMPTS."""
    out = []
    for i in range(n):
        prompt = SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]
        ids = generate(
            model,
            [int(t) for t in tokenizer.encode(prompt)],
            n_tokens,
            temperature=0.0 if i == 0 else temperature,
            seed=seed + i,
        )
        out.append(prompt + tokenizer.decode(ids))
    return out


def train_lm(cfg: LMTrainConfig, run_dir: str | Path) -> dict:
    """Train the LM as configured into run_dir (resuming from its checkpoints); returns metrics.json's dict."""
    check_train(cfg)
    run_dir = Path(run_dir).expanduser().absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    t, m = cfg.trainer, cfg.model
    t0 = time.perf_counter()
    corpus = find_corpus(cfg.corpus)
    tokenizer = build_tokenizer(cfg.corpus, corpus)
    train_tokens, val_tokens = corpus.tokens("train", tokenizer), corpus.tokens("val", tokenizer)
    val_windows = tiled_windows(val_tokens, m.n_ctx, min(t.eval_sequences, len(val_tokens) // m.n_ctx), cfg.seed)
    if len(val_windows) == 0:
        raise ConfigError(f"the validation split ({len(val_tokens)} tokens) is shorter than model.n_ctx={m.n_ctx}")
    scored = val_windows[:, 1:]  # the tokens the validation loss predicts, and their bytes
    bytes_per_token = float(tokenizer.token_lengths()[scored].sum() / scored.size)
    print(
        f"lm-train: corpus '{corpus.root}': {corpus.describe()['train_files']} train files ({len(train_tokens):,} "
        f"tokens), {corpus.describe()['val_files']} val files ({len(val_tokens):,} tokens); tokenizer "
        f"{tokenizer.kind} (vocab {tokenizer.vocab_size}, {bytes_per_token:.2f} bytes/token on validation); "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    config_dict = {
        "model": dataclasses.asdict(m),
        "optim": dataclasses.asdict(cfg.optim),
        "trainer": dataclasses.asdict(t),
        "seed": cfg.seed,
    }
    lm_config = {
        "model": dataclasses.asdict(m),
        "tokenizer": tokenizer.to_dict(),
        "corpus": _corpus_record(cfg.corpus, corpus),
        "train": config_dict,
    }
    (run_dir / LM_CONFIG).write_text(json.dumps(lm_config, indent=1))

    model = build(m, tokenizer.vocab_size, cfg.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    tx, schedule = make_optimizer(cfg.optim, t.steps)
    opt_state = tx.init(params)
    train_steps, eval_loss = make_train_steps(graphdef, tx), make_eval_loss(graphdef)

    ckpt = Checkpointer(
        run_dir / CHECKPOINTS, CheckpointConfig(every=t.checkpoint_every, keep=t.keep_checkpoints, best_metric=None)
    )
    meta = {"config": config_dict, "d_in": 0}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"params": params, "opt": opt_state})

    def check_meta(saved: dict, where: Path) -> None:
        if saved["config"]["model"] != config_dict["model"] or saved["config"]["seed"] != cfg.seed:
            raise ConfigError(
                f"checkpoint {where} was made with model={saved['config']['model']} "
                f"seed={saved['config']['seed']}; start in a new run directory"
            )

    restored = ckpt.restore(abstract, check_meta) if ckpt.steps() else None
    step = 0
    if restored is not None:
        params, opt_state, step = restored.state["params"], restored.state["opt"], restored.step
        print(f"lm-train: resumed from {restored.path} at step {step}", flush=True)
    tracker = make_tracker(cfg.logger, run_dir, config_dict, name=f"lm-{run_dir.name}")
    log_path = run_dir / "metrics.jsonl"
    kept = [
        line
        for line in (log_path.read_text().splitlines(keepends=True) if log_path.exists() else [])
        if step and line.strip() and json.loads(line)["step"] <= step
    ]
    log_file = log_path.open("w")
    log_file.writelines(kept)

    def record(values: dict) -> None:
        log_file.write(json.dumps({"step": step, "tokens": step * t.batch_size * m.n_ctx, **values}) + "\n")
        log_file.flush()
        tracker.log(step, values)

    print(
        f"lm-train: {n_params:,} parameters; {t.steps} steps × {t.batch_size} × {m.n_ctx} tokens "
        f"({t.steps * t.batch_size * m.n_ctx / 1e6:.1f}M tokens), {t.steps_per_call} steps per call",
        flush=True,
    )
    last = {"log": step, "eval": step, "ckpt": step}
    val_loss = train_loss = float("nan")
    pending: list[jax.Array] = []
    t_train, tokens_at = time.perf_counter(), step
    try:
        while step < t.steps:
            k = min(t.steps_per_call, t.steps - step)
            batches = step_batches(train_tokens, m.n_ctx, t.batch_size, cfg.seed, step, k)
            params, opt_state, losses = train_steps(params, opt_state, batches)
            pending.append(losses)
            step += k
            done = step >= t.steps
            if step - last["log"] >= t.log_every or done:
                train_loss = float(np.mean(np.concatenate([np.asarray(x) for x in pending])))
                pending = []
                rate = (step - tokens_at) * t.batch_size * m.n_ctx / max(time.perf_counter() - t_train, 1e-9)
                record({"train_loss": train_loss, "lr": float(schedule(step - 1)), "tokens_per_s": rate})
                print(
                    f"step {step}/{t.steps} | train loss {train_loss:.4f} nats/token"
                    f" | lr {float(schedule(step - 1)):.2e}"
                    f" | {rate:,.0f} tok/s | {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
                last["log"] = step
            if step - last["eval"] >= t.eval_every or done:
                val_loss = mean_loss(eval_loss, params, val_windows, t.batch_size)
                record({"val_loss": val_loss, "val_loss_per_byte": val_loss / bytes_per_token})
                print(
                    f"step {step}/{t.steps} | val loss {val_loss:.4f} nats/token, "
                    f"{val_loss / bytes_per_token:.4f} nats/byte",
                    flush=True,
                )
                last["eval"] = step
            if step - last["ckpt"] >= t.checkpoint_every or done:
                ckpt.save(step, {"params": params, "opt": opt_state}, {**meta, "step": step})
                last["ckpt"] = step
        ckpt.wait()
    finally:
        ckpt.close()
        log_file.close()
    seconds = time.perf_counter() - t0
    if math.isnan(val_loss):  # resumed at the end: nothing left to train
        val_loss = mean_loss(eval_loss, params, val_windows, t.batch_size)
    trained = nnx.merge(graphdef, params)
    samples = _sample_texts(trained, tokenizer, t.samples, t.sample_tokens, t.temperature, cfg.seed)
    for i, text in enumerate(samples):
        print(f"--- sample {i} ({'greedy' if i == 0 else f'temperature {t.temperature}'}) ---\n{text}", flush=True)
    (run_dir / "samples.txt").write_text("".join(f"--- sample {i} ---\n{s}\n" for i, s in enumerate(samples)))
    metrics = {
        "val_loss": val_loss,
        "val_bits_per_token": val_loss / math.log(2),
        "val_loss_per_byte": val_loss / bytes_per_token,
        "val_bytes_per_token": bytes_per_token,
        "train_loss": train_loss,
        "val_tokens": int(scored.size),
        "steps": step,
        "tokens": step * t.batch_size * m.n_ctx,
        "parameters": n_params,
        "seconds": seconds,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    tracker.log(step, {"final_val_loss": val_loss})
    tracker.finish()
    print(
        f"lm-train: val loss {val_loss:.4f} nats/token after {step} steps in {seconds:.0f} s; run in '{run_dir}'",
        flush=True,
    )
    return metrics
