"""Time the train step of each SAE family against one dense encoder matmul, in the same run.

  python scripts/benchmark.py --arch topk --d-in 512 --d-sae 8192 --batch 4096 --k 32 --steps 10

Prints one JSON line per architecture: arch, tokens_per_s, step_s (median), matmul_s (median time of
one float32 [batch, d_in] × [d_in, d_sae] matmul, the floor of any step) and their ratio, and the bytes
of params + optimizer state on one device. `--mesh 4x2` shards the step over a data × model mesh;
`--instances 4` also times a one-pass sweep of 4 SAEs (sweep_speedup: 4 sequential steps ÷ one sweep step).
`--l0 32` stands in for a trained state of the penalty families (relu, relu_april, jumprelu, gated): their
encoder bias (JumpReLU: its threshold) is shifted so that about 32 latents per token fire on the batch, where
at initialisation about half do; the line then also gives the step's measured `l0`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from sae import parallel
from sae.architectures import FAMILIES, make_sae
from sae.architectures.topk import TopKConfig
from sae.config import MeshConfig, OptimConfig
from sae.training.step import init_state, make_optimizer, make_sweep_step, make_train_step, pure_train_step


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each fn, timed in alternation so machine noise hits all of them alike."""
    for fn in fns:
        jax.block_until_ready(fn())  # compile / warm up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def per_device_bytes(tree) -> int:
    """Bytes of a pytree's arrays held by the first device (params + optimizer state + counters)."""
    first = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == first
    )


def sweep_runner(sae, params, tx, schedule, steps: int, x, instances: int):
    """A call of the one-pass sweep step over `instances` copies of the SAE (k, k−1, … for TopK)."""
    states = []
    for i in range(instances):
        state = init_state(sae, params, tx, 1.0)
        if isinstance(sae.cfg, TopKConfig) and sae.cfg.name == "topk":
            state = state._replace(buffers={**state.buffers, "k": jnp.asarray(max(1, sae.cfg.k - i), jnp.int32)})
        states.append(state)
    states = jax.tree.map(lambda *values: jnp.stack(values), *states)  # own buffers: the step donates them
    coefficients = [sae.sparsity_coefficient] * instances
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("instance",))
    sweep_step = make_sweep_step(pure_train_step(sae, tx, schedule, steps + 1, 0.0, 10**9), coefficients, mesh)

    def run():
        nonlocal states
        states, metrics = sweep_step(states, x)
        return metrics["loss"]

    return run


def sparse_state(sae, params, x, l0: float):
    """params with the code made about l0 active per token on x: the encoder bias (b_enc, Gated's b_gate) less
    the batch's (1 − l0 / d_sae) quantile of the pre-activations, or JumpReLU's threshold at that quantile."""
    z = x @ params["W_enc"] + (params["b_gate"] if "b_gate" in params else params["b_enc"])
    if sae.applies_pre_bias:
        z = z - params["b_dec"] @ params["W_enc"]
    t = jnp.quantile(z, 1.0 - l0 / sae.d_sae)
    if "threshold" in params:
        return {**params, "threshold": jnp.full_like(params["threshold"], jnp.maximum(t, 0.0))}
    name = "b_gate" if "b_gate" in params else "b_enc"
    return {**params, name: params[name] - t}


def benchmark(
    arch: str,
    d_in: int,
    d_sae: int,
    batch: int,
    k: int,
    steps: int,
    mesh: str | None = None,
    instances: int = 1,
    l0: float | None = None,
) -> dict:
    cfg = FAMILIES[arch].config(d_sae=d_sae)
    if isinstance(cfg, TopKConfig):
        cfg.k = k
    sae = make_sae(cfg, d_in)
    key_x, key_p = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, (batch, d_in))
    params = sae.init_params(key_p, jnp.zeros((d_in,)))
    if l0 is not None and sae.sparsity is not None:
        params = sparse_state(sae, params, x, l0)
    tx, schedule = make_optimizer(OptimConfig(), 1e-4, steps + 1)
    state = init_state(sae, params, tx, 1.0)
    shardings = None
    if mesh is not None:
        data, model = (int(n) for n in mesh.split("x"))
        device_mesh = parallel.make_mesh(MeshConfig(data=data, model=model))
        shardings = (
            parallel.state_shardings(state, d_sae, device_mesh),
            parallel.batch_sharding(device_mesh),
            parallel.replicated(device_mesh),
        )
        state = jax.device_put(state, shardings[0])
        x = jax.device_put(x, shardings[1])
    state_bytes = per_device_bytes(state)
    step = make_train_step(sae, tx, schedule, steps + 1, 0.0, 10**9, shardings)

    measured = {}

    def run_step():
        nonlocal state
        state, metrics = step(state, x)
        measured.update(metrics)
        return metrics["loss"]

    w_enc = jax.random.normal(key_p, (d_in, d_sae))
    matmul = jax.jit(lambda a, b: a @ b)
    fns = [run_step, lambda: matmul(x, w_enc)]
    if instances > 1:
        fns.append(sweep_runner(sae, params, tx, schedule, steps, x, instances))
    step_s, matmul_s, *sweep_s = interleaved_medians(fns, steps)
    sweep = {}
    if sweep_s:
        sweep = {
            "instances": instances,
            "sweep_step_s": sweep_s[0],
            "sweep_tokens_per_s": batch / sweep_s[0],
            "sequential_tokens_per_s": batch / (instances * step_s),
            "sweep_speedup": instances * step_s / sweep_s[0],
        }
    return sweep | {
        "arch": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "batch": batch,
        "k": k,
        "tokens_per_s": batch / step_s,
        "step_s": step_s,
        "matmul_s": matmul_s,
        "step_over_matmul": step_s / matmul_s,
        "device": str(jax.devices()[0].platform),
        "mesh": mesh or "1x1",
        "state_bytes_per_device": state_bytes,
        "l0": float(measured["l0"]),
        **({"step_path": int(measured["step_path"])} if "step_path" in measured else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--mesh",
        help="DATAxMODEL, e.g. 4x2 (with XLA_FLAGS=--xla_force_host_platform_device_count=8 "
        "on a CPU); default one device",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="also time a one-pass sweep of this many SAEs against as many sequential steps",
    )
    parser.add_argument("--l0", type=float, help="penalty families: shift the encoder so about this many fire")
    args = parser.parse_args()
    per_layer = [name for name, family in FAMILIES.items() if not family.cross_layer]  # CLTs: benchmark_clt.py
    archs = per_layer if args.arch == "all" else args.arch.split(",")
    unknown = [a for a in archs if a not in per_layer]
    if unknown:
        parser.error(f"--arch {','.join(unknown)}: expected some of {','.join(per_layer)} or 'all'")
    for arch in archs:
        print(
            json.dumps(
                benchmark(
                    arch, args.d_in, args.d_sae, args.batch, args.k, args.steps, args.mesh, args.instances, args.l0
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
