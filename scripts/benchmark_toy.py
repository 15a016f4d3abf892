"""Steps per second of toy-model training on the reference notebook's config, and where the time goes.

  python scripts/benchmark_toy.py [--steps 2000] [--repeats 5] [--torch-python /path/to/python]

Config: 16 instances of the ReLU-output model, n=20, m=5, batch 1024, feature probability
20^−linspace(0, 1, 16), importance 0.9^i, AdamW lr 1e-3 (Anthropic's toy-models notebook). Prints one
JSON object: steps_per_s (instances sharded over every CPU core, hash RNG: what `toy-train` does),
steps_per_s_one_device, steps_per_s_threefry (JAX's generator, all cores), and the milliseconds per
step of each part run alone on one device in the same kind of scanned loop: rng_ms (uniforms + sparse
features), model_ms (forward and backward: the matmuls), optimizer_ms (AdamW). With --torch-python (an
interpreter that has torch), the notebook-style PyTorch loop runs in the same session and the JSON
gains torch_steps_per_s and speedup.
"""

from __future__ import annotations

import argparse
import json
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from benchmark import interleaved_medians  # scripts/benchmark.py (this script's folder is on sys.path)

from toy_models import models
from toy_models.train import Task, instance_sharding, make_chunk, make_optimizer, use_all_cpu_cores

N_INSTANCES, N_FEATURES, N_HIDDEN, BATCH = 16, 20, 5, 1024

TORCH_LOOP = """
import sys, time, torch
I, n, m, B, steps = 16, 20, 5, 1024, int(sys.argv[1])
p = (20 ** -torch.linspace(0, 1, I))[:, None]
imp = (0.9 ** torch.arange(n))[None, :]
W = torch.nn.Parameter(torch.nn.init.xavier_normal_(torch.empty(I, n, m)))
b = torch.nn.Parameter(torch.zeros(I, n))
opt = torch.optim.AdamW([W, b], lr=1e-3)
def step():
    x = torch.rand(B, I, n)
    x = torch.where(torch.rand(B, I, n) <= p, x, torch.zeros(()))
    h = torch.einsum("bif,ifh->bih", x, W)
    out = torch.relu(torch.einsum("bih,ifh->bif", h, W) + b)
    loss = (imp * (x - out) ** 2).mean((0, 2)).sum()
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(50): step()
start = time.perf_counter()
for _ in range(steps): step()
print(steps / (time.perf_counter() - start))
"""


def scanned(body, n_steps: int):
    """A jitted loop of n_steps calls of body(i) -> scalar, summed so nothing is dead code."""
    return jax.jit(lambda: jax.lax.fori_loop(0, n_steps, lambda i, acc: acc + body(i), 0.0))


def benchmark(steps: int, repeats: int) -> dict:
    fp = jnp.asarray(20.0 ** -np.linspace(0, 1, N_INSTANCES), jnp.float32)
    importance = jnp.tile(0.9 ** jnp.arange(N_FEATURES, dtype=jnp.float32), (N_INSTANCES, 1))
    optimizer = make_optimizer(1e-3, "constant", steps, 0.01)
    params = models.init_params(jax.random.key(0), "relu", N_INSTANCES, N_FEATURES, N_HIDDEN)
    opt_state = optimizer.init(params)

    def training(rng: str, sharded: bool):
        chunk = make_chunk(Task("relu", N_FEATURES, N_HIDDEN, BATCH, rng=rng), optimizer, steps)
        args = (params, opt_state, fp, importance)
        if sharded:
            args = jax.tree.map(instance_sharding(N_INSTANCES)[0], args)
        p, s, f, i = args
        return lambda: chunk(p, s, jnp.uint32(0), jnp.uint32(0), f, i)[2]

    task = Task("relu", N_FEATURES, N_HIDDEN, BATCH)
    x = task.batch(jnp.uint32(0), jnp.uint32(0), fp)
    grads = jax.grad(lambda p: models.loss_per_instance(p, x, importance, "relu").sum())(params)

    def model_body(i):
        xi = x * (1.0 + i.astype(jnp.float32) * 1e-9)  # a new batch each step, without new random numbers
        g = jax.grad(lambda p: models.loss_per_instance(p, xi, importance, "relu").sum())(params)
        return g["W"][0, 0, 0] + g["b"][0, 0]

    def optimizer_body(i):
        g = jax.tree.map(lambda v: v * (1.0 + i.astype(jnp.float32) * 1e-9), grads)
        updates, _ = optimizer.update(g, opt_state, params)
        return updates["W"].sum() + updates["b"].sum()

    parts = {
        "train": training("hash", sharded=True),
        "train_one_device": training("hash", sharded=False),
        "train_threefry": training("threefry", sharded=True),
        "rng": scanned(lambda i: task.batch(jnp.uint32(0), i.astype(jnp.uint32), fp).sum(), steps),
        "model": scanned(model_body, steps),
        "optimizer": scanned(optimizer_body, steps),
    }
    seconds = dict(zip(parts, interleaved_medians(list(parts.values()), repeats)))
    return {
        "config": {"n_instances": N_INSTANCES, "n_features": N_FEATURES, "n_hidden": N_HIDDEN, "batch": BATCH},
        "steps": steps,
        "steps_per_s": steps / seconds["train"],
        "steps_per_s_one_device": steps / seconds["train_one_device"],
        "steps_per_s_threefry": steps / seconds["train_threefry"],
        "step_ms": 1e3 * seconds["train"] / steps,
        "rng_ms": 1e3 * seconds["rng"] / steps,
        "model_ms": 1e3 * seconds["model"] / steps,
        "optimizer_ms": 1e3 * seconds["optimizer"] / steps,
        "device": jax.devices()[0].platform,
        "n_devices": jax.device_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch-python", help="a Python with torch: time the notebook's PyTorch loop too")
    args = parser.parse_args()
    use_all_cpu_cores()
    result = benchmark(args.steps, args.repeats)
    if args.torch_python:
        out = subprocess.run(
            [args.torch_python, "-c", TORCH_LOOP, str(args.steps)], capture_output=True, text=True, check=True
        )
        result["torch_steps_per_s"] = float(out.stdout.split()[-1])
        result["speedup"] = result["steps_per_s"] / result["torch_steps_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
