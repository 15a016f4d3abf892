"""What checkpointing costs the training loop: the same steps with no periodic checkpoint, with asynchronous
checkpoints every N steps, and with synchronous ones, timed in alternation.

  python scripts/benchmark_checkpoint.py --d-in 512 --d-sae 8192 --batch 4096 --steps 60 --every 20

Prints one JSON line: state_mb (params + Adam moments + counters), the median seconds per step of each
variant over --repeats rounds, the checkpoints each made, and the overhead per checkpoint of the async
and sync saves (extra loop time ÷ checkpoints). Every variant ends with the loop's final save, so
that save cancels out. Checkpoints go to a temporary directory (--dir to choose its parent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from sae.architectures import make_sae
from sae.architectures.topk import TopKConfig
from sae.checkpoint import Checkpointer
from sae.config import CheckpointConfig, OptimConfig
from sae.training.loop import Hooks, run_steps
from sae.training.step import init_state, make_optimizer, make_train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="parent of the temporary checkpoint directories")
    args = parser.parse_args()

    sae = make_sae(TopKConfig(d_sae=args.d_sae, k=args.k), args.d_in)
    tx, schedule = make_optimizer(OptimConfig(), 1e-4, args.steps)
    params = sae.init_params(jax.random.key(0), jnp.zeros(args.d_in))
    step = make_train_step(sae, tx, schedule, args.steps, 0.0, 10**9)
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (args.batch, args.d_in)))
    state_mb = sum(leaf.nbytes for leaf in jax.tree.leaves(init_state(sae, params, tx, 1.0))) / 2**20
    variants = {"none": (0, True), "async": (args.every, True), "sync": (args.every, False)}

    def loop(every: int, async_save: bool) -> tuple[float, int]:
        state = init_state(sae, jax.tree.map(jnp.copy, params), tx, 1.0)
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            checkpointer = Checkpointer(
                Path(directory) / "checkpoints",
                CheckpointConfig(every=every, keep=2, best_metric=None, async_save=async_save),
            )
            start = time.perf_counter()
            run_steps(
                state,
                step,
                (x for _ in range(args.steps)),
                first_step=0,
                n_steps=args.steps,
                batch_size=args.batch,
                log_every=args.steps,
                histogram_every=10**9,
                checkpoint_every=every,
                checkpointer=checkpointer,
                meta=lambda s: {"step": s},
                hooks=Hooks(),
                summaries=lambda s: (s.fire_counts, sae.decoder_norms(s.params)),
            )
            seconds = time.perf_counter() - start
            checkpointer.close()
        return seconds, len([s for s in range(1, args.steps) if every and s % every == 0])

    loop(0, True)  # compile
    times = {name: [] for name in variants}
    saves = {}
    for _ in range(args.repeats):
        for name, (every, async_save) in variants.items():
            seconds, saves[name] = loop(every, async_save)
            times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "d_in": args.d_in,
        "d_sae": args.d_sae,
        "batch": args.batch,
        "steps": args.steps,
        "every": args.every,
        "state_mb": round(state_mb, 1),
        "device": str(jax.devices()[0].platform),
        **{f"step_s_{name}": median[name] / args.steps for name in variants},
        "checkpoints": saves["async"],
        "async_s_per_checkpoint": (median["async"] - median["none"]) / max(saves["async"], 1),
        "sync_s_per_checkpoint": (median["sync"] - median["none"]) / max(saves["sync"], 1),
        "async_overhead_fraction": median["async"] / median["none"] - 1,
        "sync_overhead_fraction": median["sync"] / median["none"] - 1,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
