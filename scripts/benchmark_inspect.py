"""Time `sae-inspect` at scale: an SAE over an activation store, statistics + examples + browser.

  python scripts/benchmark_inspect.py [--rows 1000000] [--arch topk|jumprelu] [--d-in 512] [--d-sae 8192]
      [--k 32] [--seq 128] [--vocab 50000] [--batch 4096] [--no-tokens] [--dir DIR]

Builds (once, under --dir, which is kept; default a temporary directory, removed) a float16 store of --rows
random rows (Gaussian plus a random sparse code, so latents fire unevenly) with token ids and positions of
--seq-token sequences unless --no-tokens, and a run directory holding an initialised TopK SAE (W_enc = W_dec.T
of random unit rows, b_enc 0; --arch jumprelu: a JumpReLU SAE whose threshold lets about --k latents fire per
row, inspected through the compacted code) exported as `sae-train` would, with `data=cached` at the store. Then
runs `inspect_run` on all rows and prints ONE JSON object: machine (cpu_count, load_avg_before), config, rows,
stats_s (the streamed jitted pass, compilation included), context_s (the second pass encoding the example
contexts; absent with --no-tokens), total_s (stats through neighbours, plots and the browser files),
rows_per_s (rows / stats_s), site_bytes, and, timed on one batch held in memory in the same run (medians of
--reps calls in alternation, after compilation): step_rows_per_s (the statistics step alone) against
train_forward_rows_per_s (the family's training forward: encode, decode and loss) and the step's time over the
forward's, step_over_forward."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from benchmark import interleaved_medians, sparse_state  # scripts/benchmark.py

from sae.architectures import FAMILIES, make_sae
from sae.architectures.topk import TopKConfig
from sae.data.store import Store, StoreWriter
from sae.export import export_sae
from sae.inspect import inspect_run
from sae.inspect.dictionary import load_dictionary
from sae.inspect.stats import float_bins, init_state, make_step


def make_store(path: Path, rows: int, d_in: int, seq: int, vocab: int, tokens: bool, chunk: int = 65536) -> None:
    rng = np.random.default_rng(0)
    dictionary = rng.standard_normal((4 * d_in, d_in)).astype(np.float32) / np.sqrt(d_in)
    with StoreWriter(
        path, d_in, "float16", shard_rows=262_144, with_tokens=tokens, provenance={"source": "benchmark_inspect"}
    ) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            code = rng.exponential(size=(n, 4 * d_in)).astype(np.float32) * (rng.random((n, 4 * d_in)) < 0.01)
            x = 0.3 * rng.standard_normal((n, d_in), dtype=np.float32) + code @ dictionary
            if tokens:
                index = np.arange(start, start + n)
                writer.append(x, tokens=rng.integers(0, vocab, n), positions=index % seq)
            else:
                writer.append(x)


def make_family(arch: str, d_in: int, d_sae: int, k: int):
    """The SAE the run holds: TopK with k, or JumpReLU (standing for the families with a varying number of
    active latents, inspected through the compacted code)."""
    cfg = FAMILIES[arch].config(d_sae=d_sae)
    if isinstance(cfg, TopKConfig):
        cfg.k = k
    return make_sae(cfg, d_in)


def make_run(path: Path, store: Path, arch: str, d_in: int, d_sae: int, k: int) -> None:
    """An initialised SAE (W_enc = W_dec.T of random unit rows, b_enc 0) exported as sae-train would; JumpReLU's
    threshold is set so that about k latents fire per row of the store (as after training)."""
    sae = make_family(arch, d_in, d_sae, k)
    params = sae.init_params(jax.random.PRNGKey(0), np.zeros(d_in, np.float32))
    if arch == "jumprelu":
        params = sparse_state(sae, params, jnp.asarray(Store(store).read_rows(0, 4096), jnp.float32), k)
    export_sae(
        path / "sae", sae, params, {}, 1.0, metadata={"config": {"data": {"name": "cached", "path": str(store)}}}
    )


def step_against_forward(run: Path, store: Path, arch: str, k: int, batch: int, reps: int) -> dict:
    """Rows/s of the statistics step and of the family's training forward (encode, decode, loss: JumpReLU's
    on its sparse path where the code fits) on one batch of the store held in memory."""
    sae = load_dictionary(run / "sae")
    d_in, d_sae = sae.d_in, sae.d_sae
    x = jnp.asarray(Store(store).read_rows(0, batch), jnp.float32)
    _, _, n_bins, _ = float_bins(4, 2.0**-14, 2.0**10)
    step = make_step(sae, batch, 4, 2.0**-14, 2.0**10, 16, 16, 4, 0)
    state = [init_state(d_sae, n_bins, 16, 16)]

    def stats():
        state[0], floor = step(sae.params, state[0], x, jnp.int32(0), jnp.int32(batch))
        return floor

    model = make_family(arch, d_in, d_sae, k)
    params = {name: sae.params[name] for name in model.init_params(jax.random.PRNGKey(0), np.zeros(d_in, np.float32))}
    dead = jnp.zeros(d_sae, bool)
    coefficient = jnp.float32(model.sparsity_coefficient)
    forward = jax.jit(lambda p, x: model.forward(p, {}, x, x, dead, coefficient).loss)
    step_s, forward_s = interleaved_medians([stats, lambda: forward(params, x)], reps)
    return {
        "step_rows_per_s": round(batch / step_s),
        "train_forward_rows_per_s": round(batch / forward_s),
        "step_over_forward": round(step_s / forward_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--arch", choices=("topk", "jumprelu"), default="topk")
    p.add_argument("--k", type=int, default=32, help="TopK's k; JumpReLU's threshold gives about this L0")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--no-tokens", action="store_true")
    p.add_argument("--reps", type=int, default=5, help="timed calls of the in-memory step and forward")
    p.add_argument("--dir", default=None, help="where the store and run go, kept (default: a temporary directory)")
    args = p.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-inspect-"))
    store, run = root / "store", root / "run"
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    if not (store / "manifest.json").is_file():
        make_store(store, args.rows, args.d_in, args.seq, args.vocab, not args.no_tokens)
    if Store(store).n_rows != args.rows or Store(store).with_tokens == args.no_tokens:
        raise SystemExit(f"{store} holds another store; remove it or choose another --dir")
    make_run(run, store, args.arch, args.d_in, args.d_sae, args.k)
    setup_s = time.perf_counter() - t0
    insp = inspect_run(run, batch_size=args.batch)
    timings = insp.meta["timings"]
    site = run / "inspect"
    result = {
        "machine": {"cpu_count": os.cpu_count(), "load_avg_before": load_before, "device": str(jax.devices()[0])},
        "config": vars(args),
        "rows": insp.n_rows,
        "setup_s": round(setup_s, 1),
        **{k: round(v, 1) for k, v in timings.items()},
        "rows_per_s": round(insp.n_rows / timings["stats_s"]),
        "site_bytes": sum(f.stat().st_size for f in site.rglob("*.js")) + (site / "index.html").stat().st_size,
        "dead": len(insp.dead),
        "mean_l0": float((insp.l0[0] * insp.l0[1]).sum() / insp.n_rows),
        **step_against_forward(run, store, args.arch, args.k, args.batch, args.reps),
    }
    print(json.dumps(result))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
