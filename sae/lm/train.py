"""`lm-train`: train a GPT-2-layout LM (sae/models/gpt2.py, ReLU MLP, untied unembedding) on a text corpus.

Next-token cross-entropy (nats/token), AdamW (Loshchilov & Hutter 2019) with linear warm-up and cosine
decay, global-norm clipping. Parameters and optimizer state are plain pytrees; `steps_per_call` steps
run as one `lax.scan` inside one `jax.jit` with the state donated. The batch of step s is
`random_windows` drawn from np.random.default_rng((seed, s)), so a run resumed from a checkpoint sees
the batches an uninterrupted run would.

Run directory: hf/ (the model as a Hugging Face `gpt2` directory: config.json, model.safetensors,
tokenizer.json; rewritten whole at every checkpoint, so it is always the newest one), lm_config.json
(model, tokenizer, corpus), checkpoints/<step>/ (orbax, sae/checkpoint.py: parameters and optimizer
state, for resuming), metrics.jsonl (train loss per log interval, val loss per evaluation), metrics.json
(final val/train loss, tokens, time), samples.txt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from sae.checkpoint import CHECKPOINTS, Checkpointer, Preempted
from sae.config import CheckpointConfig, CorpusConfig
from sae.errors import ConfigError
from sae.interrupts import StopSignals
from sae.lm.config import LMModelConfig, LMOptimConfig, LMTrainConfig, check_train
from sae.lm.text import Corpus, build_tokenizer, find_corpus, random_windows, tiled_windows, token_lengths
from sae.models.base import token_losses
from sae.models.generate import generate
from sae.models.gpt2 import GPT2, GPT2Config, save_hf
from sae.models.tokenizer import TOKENIZER, Tokenizer
from sae.models.weights import RandomWeights
from sae.outputs import check_writable, disk_errors, records_up_to, replaced_dir, write_atomic
from sae.progress import Progress, duration, rate_text
from sae.tracking import make_tracker

LM_CONFIG = "lm_config.json"
HF_DIR = "hf"  # the model as a transformers gpt2 checkpoint
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


def gpt2_config(m: LMModelConfig, tokenizer: Tokenizer) -> GPT2Config:
    """The in-house LM as a GPT-2 config: ReLU MLP of d_mlp, untied unembedding, no BOS, EOT as EOS."""
    return GPT2Config(
        model_type="gpt2",
        n_layers=m.n_layers,
        d_model=m.d_model,
        n_heads=m.n_heads,
        d_mlp=m.d_mlp,
        vocab_size=tokenizer.vocab_size,
        n_ctx=m.n_ctx,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_id,
        activation_function="relu",
        tie_word_embeddings=False,
    )


def build(m: LMModelConfig, tokenizer: Tokenizer, seed: int = 0) -> GPT2:
    """A fresh model: N(0, 0.02²) matrices and embeddings, zero biases, unit LayerNorm scales."""
    return GPT2(gpt2_config(m, tokenizer), RandomWeights(seed))


def save_model(model: GPT2, tokenizer: Tokenizer, run_dir: Path) -> None:
    """Write run_dir/hf/ whole (config.json, model.safetensors, tokenizer.json) or leave the old one."""
    with replaced_dir(run_dir / HF_DIR) as tmp:
        save_hf(model, tmp)
        tokenizer.tokenizer.save(str(tmp / TOKENIZER))


def _sample_texts(model: GPT2, tokenizer: Tokenizer, n: int, n_tokens: int, temperature: float, seed: int) -> list[str]:
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


def _crossed(step: int, k: int, every: int) -> bool:
    """Whether the call that took the run from step − k to step passed a multiple of `every` (so a resumed
    run logs, evaluates and checkpoints at the steps an uninterrupted one does)."""
    return step // every > (step - k) // every


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


@dataclasses.dataclass
class _Data:
    corpus: Corpus
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_windows: np.ndarray  # [n, n_ctx]: the fixed validation set
    bytes_per_token: float  # of the tokens the validation loss predicts


def _prepare_data(cfg: LMTrainConfig) -> _Data:
    """Find the corpus, build the tokenizer, cut the validation windows; prints one line about them."""
    t, m = cfg.trainer, cfg.model
    t0 = time.perf_counter()
    corpus = find_corpus(cfg.corpus)
    tokenizer = build_tokenizer(cfg.corpus, corpus)
    train_tokens, val_tokens = corpus.tokens("train", tokenizer), corpus.tokens("val", tokenizer)
    val_windows = tiled_windows(val_tokens, m.n_ctx, min(t.eval_sequences, len(val_tokens) // m.n_ctx), cfg.seed)
    if len(val_windows) == 0:
        raise ConfigError(f"the validation split ({len(val_tokens)} tokens) is shorter than model.n_ctx={m.n_ctx}")
    scored = val_windows[:, 1:]  # the tokens the validation loss predicts, and their bytes
    bytes_per_token = float(token_lengths(tokenizer)[scored].sum() / scored.size)
    print(
        f"lm-train: corpus '{corpus.root}': {corpus.describe()['train_files']} train files ({len(train_tokens):,} "
        f"tokens), {corpus.describe()['val_files']} val files ({len(val_tokens):,} tokens); tokenizer "
        f"{cfg.corpus.tokenizer} (vocab {tokenizer.vocab_size}, {bytes_per_token:.2f} bytes/token on validation); "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return _Data(corpus, tokenizer, train_tokens, val_windows, bytes_per_token)


class _MetricsLog:
    """metrics.jsonl: the records up to the resumed step kept, then one line per record (and to the tracker)."""

    def __init__(self, path: Path, step: int, tokens_per_step: int, tracker):
        kept = records_up_to(path, step)
        self.file = path.open("w")
        self.file.writelines(kept)
        self.tokens_per_step, self.tracker = tokens_per_step, tracker

    def record(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, "tokens": step * self.tokens_per_step, **values}) + "\n")
        self.file.flush()
        self.tracker.log(step, values)


@dataclasses.dataclass
class _State:
    """Where training stands: the arrays, the step, and what a checkpoint's meta carries besides them (the
    last losses and the train losses since the last log line), so a resumed run logs what an uninterrupted
    one does."""

    params: dict
    opt_state: object
    step: int = 0
    train_loss: float = float("nan")
    val_loss: float = float("nan")
    pending: list = dataclasses.field(default_factory=list)  # per-step train losses not yet logged

    def meta(self) -> dict:
        losses = np.concatenate([np.asarray(x) for x in self.pending]).tolist() if self.pending else []
        return {"pending_losses": losses, "train_loss": _finite(self.train_loss), "val_loss": _finite(self.val_loss)}

    @classmethod
    def restored(cls, arrays: dict, step: int, meta: dict) -> _State:
        pending = [np.asarray(meta["pending_losses"], np.float32)] if meta.get("pending_losses") else []
        loss = _nan_if_none(meta.get("train_loss"))
        return cls(arrays["params"], arrays["opt"], step, loss, _nan_if_none(meta.get("val_loss")), pending)


def train_lm(cfg: LMTrainConfig, run_dir: str | Path) -> dict:
    """Train the LM as configured into run_dir (resuming from its checkpoints); returns metrics.json's dict.

    Ctrl-C (SIGINT) or SIGTERM saves a checkpoint of the step reached and raises Preempted (running the same
    again resumes, ending as an uninterrupted run would); a full or read-only disk raises one OutputError line
    naming the last intact checkpoint.
    """
    check_train(cfg)
    run_dir = Path(run_dir).expanduser().absolute()
    check_writable(run_dir, "the run directory")
    ckpt: Checkpointer | None = None
    kept = lambda: ckpt.intact() if ckpt is not None else "no checkpoint was written yet"
    with disk_errors(run_dir, kept=kept):
        t0 = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        data = _prepare_data(cfg)
        config_dict = _config_dict(cfg)
        lm_config = {
            "model": config_dict["model"],
            "tokenizer": data.tokenizer.to_dict(),
            "corpus": _corpus_record(cfg.corpus, data.corpus),
            "train": config_dict,
        }
        write_atomic(run_dir / LM_CONFIG, json.dumps(lm_config, indent=1).encode())
        graphdef, params = nnx.split(build(cfg.model, data.tokenizer, cfg.seed), nnx.Param)
        params = nnx.to_pure_dict(params)
        tx, schedule = make_optimizer(cfg.optim, cfg.trainer.steps)
        state = _State(params, tx.init(params))
        t = cfg.trainer
        ckpt = Checkpointer(
            run_dir / CHECKPOINTS, CheckpointConfig(every=t.checkpoint_every, keep=t.keep_checkpoints, best_metric=None)
        )
        with ckpt:
            state = _resume(ckpt, state, config_dict)
            tracker = make_tracker(cfg.logger, run_dir, config_dict, name=f"lm-{run_dir.name}")
            log = _MetricsLog(run_dir / "metrics.jsonl", state.step, t.batch_size * cfg.model.n_ctx, tracker)
            n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
            print(
                f"lm-train: {n_params:,} parameters; {t.steps} steps × {t.batch_size} × {cfg.model.n_ctx} tokens "
                f"({t.steps * t.batch_size * cfg.model.n_ctx / 1e6:.1f}M tokens), {t.steps_per_call} steps per call",
                flush=True,
            )
            try:
                steps, eval_loss = make_train_steps(graphdef, tx), make_eval_loss(graphdef)
                _train_loop(cfg, run_dir, graphdef, state, data, ckpt, log, steps, eval_loss, schedule)
            finally:
                log.file.close()
        seconds = time.perf_counter() - t0
        if math.isnan(state.val_loss):  # resumed at the end from a checkpoint that did not record it
            state.val_loss = mean_loss(make_eval_loss(graphdef), state.params, data.val_windows, t.batch_size)
        metrics = _finish(cfg, run_dir, nnx.merge(graphdef, state.params), state, data, n_params, seconds)
        tracker.log(state.step, {"final_val_loss": state.val_loss})
        tracker.finish()
    print(
        f"lm-train: val loss {state.val_loss:.4f} nats/token after {state.step} steps in {metrics['seconds']:.0f} s; "
        f"run in '{run_dir}'",
        flush=True,
    )
    return metrics


def _config_dict(cfg: LMTrainConfig) -> dict:
    """The training settings a checkpoint and lm_config.json record."""
    return {
        "model": dataclasses.asdict(cfg.model),
        "optim": dataclasses.asdict(cfg.optim),
        "trainer": dataclasses.asdict(cfg.trainer),
        "seed": cfg.seed,
    }


def _resume(ckpt: Checkpointer, state: _State, config_dict: dict) -> _State:
    """The newest readable checkpoint's state (refusing one of another model or seed), or `state` itself."""
    arrays = {"params": state.params, "opt": state.opt_state}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays)

    def check_meta(saved: dict, where: Path) -> None:
        if saved["config"]["model"] != config_dict["model"] or saved["config"]["seed"] != config_dict["seed"]:
            raise ConfigError(
                f"checkpoint {where} was made with model={saved['config']['model']} "
                f"seed={saved['config']['seed']}; start in a new run directory"
            )

    restored = ckpt.restore(abstract, check_meta) if ckpt.steps() else None
    if restored is None:
        return state
    print(f"lm-train: resumed from {restored.path} at step {restored.step}", flush=True)
    return _State.restored(restored.state, restored.step, restored.meta)


def _train_loop(
    cfg,
    run_dir: Path,
    graphdef: nnx.GraphDef,
    state: _State,
    data: _Data,
    ckpt: Checkpointer,
    log: _MetricsLog,
    train_steps,
    eval_loss,
    schedule,
):
    """Train `state` in place up to trainer.steps: log, evaluate and checkpoint at multiples of their intervals
    (rounded up to whole calls); on Ctrl-C or SIGTERM save the step reached and raise Preempted."""
    t, n_ctx = cfg.trainer, cfg.model.n_ctx
    meta = {"config": _config_dict(cfg), "d_in": 0}
    timer = Progress(t.steps, state.step, "lm-train", "steps")  # rates after the first call (its compilation)

    def save() -> None:
        arrays = {"params": state.params, "opt": state.opt_state}
        ckpt.save(state.step, arrays, {**meta, "step": state.step, **state.meta()})
        save_model(nnx.merge(graphdef, state.params), data.tokenizer, run_dir)

    with StopSignals(what="training") as stop:
        while state.step < t.steps:
            k = min(t.steps_per_call, t.steps - state.step)
            batches = step_batches(data.train_tokens, n_ctx, t.batch_size, cfg.seed, state.step, k)
            state.params, state.opt_state, losses = train_steps(state.params, state.opt_state, batches)
            state.pending.append(losses)
            state.step += k
            step, done = state.step, state.step >= t.steps
            timer.mark(step)
            if _crossed(step, k, t.log_every) or done:
                state.train_loss = float(np.mean(np.concatenate([np.asarray(x) for x in state.pending])))
                state.pending = []
                steps_per_s, left = timer.measure(step)
                tokens_per_s = steps_per_s * t.batch_size * n_ctx
                lr = float(schedule(step - 1))
                log.record(step, {"train_loss": state.train_loss, "lr": lr, "tokens_per_s": tokens_per_s})
                print(
                    f"step {step}/{t.steps} | train loss {state.train_loss:.4f} nats/token | lr {lr:.2e}"
                    f" | {tokens_per_s:,.0f} tok/s | {rate_text(steps_per_s)} steps/s | ETA {duration(left)}",
                    flush=True,
                )
            if _crossed(step, k, t.eval_every) or done:
                state.val_loss = mean_loss(eval_loss, state.params, data.val_windows, t.batch_size)
                per_byte = state.val_loss / data.bytes_per_token
                log.record(step, {"val_loss": state.val_loss, "val_loss_per_byte": per_byte})
                print(
                    f"step {step}/{t.steps} | val loss {state.val_loss:.4f} nats/token, {per_byte:.4f} nats/byte",
                    flush=True,
                )
            saved = _crossed(step, k, t.checkpoint_every) or done
            if saved:
                save()
            if stop.requested:
                if not saved:
                    save()
                ckpt.wait()
                raise Preempted(step, ckpt.directory, stop.requested)
    ckpt.wait()


def _finish(cfg, run_dir: Path, model: GPT2, state: _State, data: _Data, n_params: int, seconds: float) -> dict:
    """Print and write samples.txt and metrics.json (each whole or not at all); returns the metrics."""
    t = cfg.trainer
    samples = _sample_texts(model, data.tokenizer, t.samples, t.sample_tokens, t.temperature, cfg.seed)
    for i, text in enumerate(samples):
        print(f"--- sample {i} ({'greedy' if i == 0 else f'temperature {t.temperature}'}) ---\n{text}", flush=True)
    write_atomic(run_dir / "samples.txt", "".join(f"--- sample {i} ---\n{s}\n" for i, s in enumerate(samples)).encode())
    metrics = {
        "val_loss": state.val_loss,
        "val_bits_per_token": state.val_loss / math.log(2),
        "val_loss_per_byte": state.val_loss / data.bytes_per_token,
        "val_bytes_per_token": data.bytes_per_token,
        "train_loss": state.train_loss,
        "val_tokens": int(data.val_windows[:, 1:].size),
        "steps": state.step,
        "tokens": state.step * t.batch_size * cfg.model.n_ctx,
        "parameters": n_params,
        "seconds": seconds,
    }
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics
