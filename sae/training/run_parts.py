"""What a single run and a sweep share: the start (steps, lr, b_dec, optimiser), the progress log, the
hooks that log and track each SAE, the checkpoint's meta, and the final evaluation and export."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae import config as config_lib
from sae import tracking
from sae.architectures import SAE, make_sae
from sae.architectures.base import pair
from sae.checkpoint import Checkpointer
from sae.data import ROW_SOURCES
from sae.evals import evaluate, feature_table
from sae.export import export_sae
from sae.export_clt import export_clt
from sae.outputs import records_up_to, replaced_dir, write_atomic
from sae.progress import duration, si
from sae.training.geometric_median import geometric_median
from sae.training.loop import Hooks, scratch_dir
from sae.training.step import make_optimizer


class ProgressLog:
    """Console line and metrics.jsonl record per log interval, from metrics already on the host.

    A resumed run (resume_step > 0) starts the file with the records up to its checkpoint from `history`
    (the run it resumes: this same file, or another run's) and appends after them.
    """

    def __init__(self, path: Path, n_steps: int, batch_size: int, resume_step: int = 0, history: Path | None = None):
        kept = records_up_to(history or path, resume_step)
        self.file = path.open("w")
        self.file.writelines(kept)
        self.n_steps, self.batch_size = n_steps, batch_size
        self.first: tuple[int, float] | None = None  # (step, time) after compilation

    def write(self, step: int, metrics: dict) -> dict:
        """Print and append the step's record; returns it (with tokens and tokens_per_s)."""
        now = time.perf_counter()
        tokens = step * self.batch_size
        if self.first is None:
            self.first = (step, now)
            rate = float("nan")
        else:
            rate = (step - self.first[0]) * self.batch_size / max(now - self.first[1], 1e-9)
        record = {"step": step, "tokens": tokens, **{k: float(v) for k, v in metrics.items()}, "tokens_per_s": rate}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        eta = (self.n_steps - step) * self.batch_size / rate if not math.isnan(rate) and rate > 0 else float("nan")
        print(
            f"step {step}/{self.n_steps}"
            f" | tokens {si(tokens)}/{si(self.n_steps * self.batch_size)}"
            f" | {si(rate) if not math.isnan(rate) else '-'} tok/s"
            f" | ETA {duration(eta) if not math.isnan(eta) else '-'}"
            f" | loss {record['loss']:.4g} | L0 {record['l0']:.2f} | FVU {record['fvu']:.4f}"
            f" | dead {100 * record['dead_fraction']:.1f}%",
            flush=True,
        )
        return record

    def close(self) -> None:
        self.file.close()


def input_scale_for(sample: jax.Array, normalize: bool) -> float:
    """Factor making E‖x‖ = √d_in (Anthropic April 2024 update), or 1."""
    if not normalize:
        return 1.0
    return float(math.sqrt(sample.shape[-1]) / jnp.mean(jnp.linalg.norm(sample, axis=-1)))


class Start(NamedTuple):
    n_steps: int
    lr: float
    input_scale: float
    params: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def sae_for(cfg_sae, source) -> SAE:
    """The dictionary a source's batches train: an SAE on x, a transcoder on pairs (the source's d_out), a
    cross-layer one on every layer's pairs (its n_layers). ConfigError for a family that cannot."""
    return make_sae(cfg_sae, source.d_in, getattr(source, "d_out", None), getattr(source, "n_layers", None))


def initial_parameters(cfg: config_lib.Config, sae, source) -> Start:
    """Steps, lr, input scale, initial params and optimiser. b_dec starts at the geometric median of a
    sample for an SAE, at the mean of the targets for a transcoder (b_dec is in y's space)."""
    trainer = cfg.trainer
    n_steps = trainer.total_tokens // trainer.batch_size
    lr = cfg.optim.lr if cfg.optim.lr is not None else sae.default_lr()
    sample, target = pair(source.sample(trainer.geometric_median_samples, cfg.seed))
    input_scale = input_scale_for(sample, cfg.sae.normalize_activations)
    b_dec = geometric_median(sample * input_scale) if target is None else jnp.mean(target, axis=0)
    params = sae.init(jax.random.PRNGKey(cfg.seed), b_dec)
    params = jax.tree.map(lambda v: v.astype(trainer.param_dtype), params)
    tx, schedule = make_optimizer(cfg.optim, lr, n_steps)
    return Start(n_steps, lr, input_scale, params, tx, schedule)


@dataclasses.dataclass
class Instance:
    """One SAE of a run (a sweep has several): its family, config, run dir, progress log and tracker."""

    sae: SAE
    cfg: config_lib.Config
    out_dir: Path
    log: ProgressLog
    tracker: tracking.Tracker


def export_buffers(buffers: dict) -> dict:
    """The architecture's buffers without a sweep's per-instance k (which the export takes from the config)."""
    return {name: value for name, value in buffers.items() if name != "k"}


class RunHooks(Hooks):
    """Process 0's side of the loop: progress lines, metrics.jsonl and the tracker, for each instance.

    stacked: states and metrics carry a leading instance axis (a sweep).
    """

    def __init__(self, instances: list[Instance], source, stacked: bool):
        self.instances, self.source, self.stacked = instances, source, stacked

    def split(self, tree) -> list:
        """Per-instance parts of a state or metrics tree (arrays on a leading instance axis)."""
        if not self.stacked:
            return [tree]
        return [jax.tree.map(lambda v, i=i: v[i], tree) for i in range(len(self.instances))]

    def log(self, step: int, metrics: dict) -> None:
        for one, values in zip(self.instances, self.split(metrics)):
            record = one.log.write(step, values)
            one.tracker.log(step, record)

    def histograms(self, step: int, fire_counts: np.ndarray, decoder_norms: np.ndarray, window_tokens: int) -> None:
        for one, counts, norms in zip(self.instances, self.split(fire_counts), self.split(decoder_norms)):
            density = np.asarray(counts, np.float64) / max(window_tokens, 1)
            log_density = np.log10(density + 1e-10)  # SAELens's log_feature_sparsity
            one.tracker.log_histograms(step, {"feature_density_log10": log_density, "decoder_norm": norms})

    def close(self) -> None:
        for one in self.instances:
            one.log.close()
            one.tracker.finish()

    def checkpointed(self, step: int, host_state, metrics: dict, best: bool) -> None:
        if host_state is None:
            return
        for one, state in zip(self.instances, self.split(host_state)):
            log_dictionary(one, state, self.source, step, ["latest"] + (["best"] if best else []))


def log_dictionary(one: Instance, state, source, step: int, aliases: list[str]) -> None:
    """The feature dictionary as a tracker artifact (type `sae`): the SAELens-format export plus a
    per-feature table (density, mean and max activation on held-out data, the best true feature)."""
    buffers = export_buffers(state.buffers)
    table = feature_table(
        one.sae,
        state.params,
        buffers,
        state.input_scale,
        source.eval_batches(one.cfg.trainer.batch_size),
        source.ground_truth,
    )
    with scratch_dir(one.out_dir) as scratch:
        metadata = {"config": config_lib.to_dict(one.cfg), "step": step}
        export_dictionary(Path(scratch), one.sae, state.params, buffers, float(state.input_scale), source, metadata)
        one.tracker.log_artifact(
            f"sae-{one.tracker.run_id}",
            "sae",
            Path(scratch),
            table=table,
            metadata={"step": step, "architecture": one.cfg.sae.name, "d_sae": one.sae.d_sae},
            aliases=aliases + [f"step-{step}"],
        )


def export_dictionary(directory: Path, sae: SAE, params, buffers, input_scale: float, source, metadata: dict):
    """SAELens's format for an SAE or per-layer transcoder (`export_sae`), circuit-tracer's for a CLT."""
    if not sae.cross_layer:
        return export_sae(directory, sae, params, buffers, input_scale, metadata=metadata)
    sites_in, sites_out = source.hook_names, source.hook_names_out
    meta = {k: metadata[k] for k in ("model_name",) if k in metadata}
    return export_clt(directory, sae, params, input_scale, sites_in, sites_out, {**meta, "sae_jax_run": metadata})


def run_space(checkpointer: Checkpointer, state) -> int:
    """Bytes a run may still write: its checkpoints (Checkpointer.space_needed) and the export of its weights."""
    return checkpointer.space_needed(state) + sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))


def loop_settings(cfg: config_lib.Config) -> dict:
    """The keyword arguments of `run_steps` that come straight from the config."""
    return {
        "batch_size": cfg.trainer.batch_size,
        "log_every": cfg.trainer.log_every,
        "histogram_every": cfg.logger.histogram_every,
        "checkpoint_every": cfg.checkpoint.every,
        "dictionaries": cfg.logger.name == "wandb",
    }


def run_meta(cfg: config_lib.Config, d_in: int, trackers: list[tracking.Tracker]):
    """meta(step): a checkpoint's JSON (see sae/checkpoint.py)."""
    config = config_lib.to_dict(cfg)

    def meta(step: int) -> dict:
        return {
            "step": step,
            "tokens": step * cfg.trainer.batch_size,
            "seed": cfg.seed,
            "data_position": {"batches": step},
            "d_in": d_in,
            "config": config,
            "wandb_run_ids": [t.run_id for t in trackers],
        }

    return meta


SUMMARY = (
    "mse",
    "fvu",
    "explained_variance",
    "l0",
    "dead_fraction",
    "mmcs",
    "recovered_fraction",
    "ce_loss_score",
    "kl_div",
    "embedding_cosine",
)


def _row_source(source):
    """The registry entry of the row source a store was cached from, or None (not a store, or unknown)."""
    store = getattr(source, "store", None)
    name = store.provenance.get("source") if store is not None else None
    return ROW_SOURCES[name] if name in ROW_SOURCES else None


def replacement_scores(sae: SAE, params: dict, buffers: dict, input_scale: float, source) -> dict:
    """For pairs cached from a model: the replacement model's CE-loss score, KL and top-1 agreement, every
    trained output site replaced by the dictionary's prediction from the replaced model's own inputs (a
    transcoder: its layer; a CLT: every layer); {} for sources that cannot be scored."""
    entry = _row_source(source)
    if entry is None or entry.replacement is None:
        return {}
    pairs = list(zip(source.hook_names, source.hook_names_out))

    def predict(j: int, inputs: list[jax.Array]) -> jax.Array:
        scaled = [x.astype(jnp.float32) * input_scale for x in inputs]
        if sae.cross_layer:
            acts = [sae.encode_layer(params, layer, x) for layer, x in enumerate(scaled)]
            return sae.decode_layer(params, acts, j)
        return sae(params, scaled[j], buffers)

    out = entry.replacement(source.store.path, pairs, predict)
    return {k: v for k, v in out.items() if k not in ("n_tokens", "n_texts")}


def loss_recovered(sae: SAE, params: dict, buffers: dict, input_scale: float, source) -> dict:
    """For a store cached from a model: the CE-loss score and KL with the SAE's reconstruction spliced in at
    the cached site, scored by the store's row source (its `loss_recovered`, found from the store's
    provenance); a transcoder's are its replacement model's (`replacement_scores`); {} for sources that
    have none."""
    if sae.transcoder:
        return replacement_scores(sae, params, buffers, input_scale, source)
    entry = _row_source(source)
    score = entry.loss_recovered if entry is not None else None
    if score is None:
        return {}

    def reconstruct(x: jax.Array) -> jax.Array:
        return sae.decode(params, sae.encode(params, x.astype(jnp.float32) * input_scale, buffers)) / input_scale

    return {k: v for k, v in score(source.store.path, reconstruct).items() if k not in ("n_tokens", "n_texts")}


def saelens_model_fields(source) -> dict:
    """SAELens's cfg metadata about the model, for rows cached from one (source=hf): model_name, hook_name,
    context_size, prepend_bos, dataset_path; {} otherwise."""
    store = getattr(source, "store", None)
    provenance = store.provenance if store is not None else {}
    if provenance.get("source") != "hf":
        return {}
    out = {"hook_name_out": source.hook_names_out[0]} if getattr(source, "hook_names_out", None) else {}
    return {
        **out,
        "model_name": provenance["model_name"],
        "hook_name": provenance["hook_name"],
        "context_size": provenance["context_length"],
        "prepend_bos": bool(provenance["template"]["prefix"]),
        "dataset_path": provenance["dataset"]["path"],
    }


def finish(
    sae, cfg: config_lib.Config, state, buffers: dict, source, out_dir: Path, tracker: tracking.Tracker | None = None
) -> dict:
    """Held-out evaluation (written to out_dir/metrics.json, and to the tracker's summary) and the
    SAELens-format export of a trained state."""
    trainer = cfg.trainer
    results = evaluate(
        sae,
        state.params,
        buffers,
        state.input_scale,
        source.eval_batches(trainer.batch_size),
        source.ground_truth,
        getattr(source, "ground_truth_in", None),
    )
    results["dead_fraction"] = float(np.mean(np.asarray(state.tokens_since_fired) >= trainer.dead_tokens))
    results["architecture"] = cfg.sae.name
    results["tokens"] = trainer.total_tokens // trainer.batch_size * trainer.batch_size
    results.update(loss_recovered(sae, state.params, buffers, float(state.input_scale), source))
    if tracker is not None:
        tracker.log(int(state.step), {f"eval/{k}": results[k] for k in SUMMARY if k in results})
        if tracker.run_id is not None:
            results["wandb_run_id"] = tracker.run_id  # where sae-inspect logs its plots
    write_atomic(out_dir / "metrics.json", json.dumps(results, indent=2).encode())
    with replaced_dir(out_dir / "sae") as export_dir:
        metadata = {"config": config_lib.to_dict(cfg), **saelens_model_fields(source)}
        export_dictionary(export_dir, sae, state.params, buffers, float(state.input_scale), source, metadata)
    print(
        f"final (held-out) {out_dir.name}: " + " | ".join(f"{k} {results[k]:.4g}" for k in SUMMARY if k in results),
        flush=True,
    )
    return results
