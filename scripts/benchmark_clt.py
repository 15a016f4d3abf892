"""Time a cross-layer transcoder's train step against its dense encoder matmuls, in the same run.

  python scripts/benchmark_clt.py --layers 2,4 --d-model 128 --features 4096 --batch 4096 --steps 10

Prints one JSON line per (layers, activation): step_s (median), encoder_matmul_s (median time of the L
float32 [batch, d_model] × [d_model, F] matmuls of the encoders, as one batched einsum), their ratio, the
decoder matmuls' time (the L(L+1)/2 [batch, F] × [F, d_model] products of ŷ, as the step computes them)
and tokens per second.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from benchmark import interleaved_medians

from sae.architectures import make_sae
from sae.architectures.clt import CLTConfig
from sae.config import OptimConfig
from sae.training.step import init_state, make_optimizer, make_train_step


def benchmark(n_layers: int, activation: str, d_model: int, features: int, batch: int, k: int, steps: int) -> dict:
    clt = make_sae(CLTConfig(d_sae=features, activation=activation, k=k), d_model, d_model, n_layers)
    key_x, key_y, key_p = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(key_x, (batch, n_layers, d_model))
    y = jax.random.normal(key_y, (batch, n_layers, d_model))
    params = clt.init(key_p, jnp.zeros((n_layers, d_model)))
    tx, schedule = make_optimizer(OptimConfig(), 1e-4, steps + 1)
    state = init_state(clt, params, tx, 1.0)
    step = make_train_step(clt, tx, schedule, steps + 1, 0.0, 10**9)

    def run_step():
        nonlocal state
        state, metrics = step(state, (x, y))
        return metrics["loss"]

    w_enc = jnp.array(params["W_enc"])
    decoders = [jnp.array(params[f"W_dec_{layer}"]) for layer in range(n_layers)]
    a = jax.nn.relu(jax.random.normal(key_p, (batch, n_layers, features)))
    encode = jax.jit(lambda x, w: jnp.einsum("bld,ldf->blf", x, w))
    decode = jax.jit(lambda a, ws: [jnp.einsum("bf,fmd->bmd", a[:, i], w) for i, w in enumerate(ws)])
    step_s, encode_s, decode_s = interleaved_medians(
        [run_step, lambda: encode(x, w_enc), lambda: decode(a, decoders)], steps
    )
    return {
        "n_layers": n_layers,
        "activation": activation,
        "d_model": d_model,
        "features_per_layer": features,
        "batch": batch,
        "k": k if activation == "topk" else None,
        "step_s": step_s,
        "encoder_matmul_s": encode_s,
        "step_over_encoder_matmul": step_s / encode_s,
        "decoder_matmul_s": decode_s,
        "tokens_per_s": batch / step_s,
        "device": str(jax.devices()[0].platform),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,4", help="comma-separated layer counts")
    parser.add_argument("--activations", default="topk,jumprelu")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--features", type=int, default=4096, help="features per layer")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32, help="TopK's active features per layer")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for n_layers in (int(n) for n in args.layers.split(",")):
        for activation in args.activations.split(","):
            line = benchmark(n_layers, activation, args.d_model, args.features, args.batch, args.k, args.steps)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
