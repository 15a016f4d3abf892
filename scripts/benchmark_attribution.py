"""Time attribution graphs (circuit tracing: sae.circuits.attribute) per prompt length, on a random model.

  python scripts/benchmark_attribution.py --lengths 32,64,128 --features 4096 --k 16 --layers 2 --repeats 3 --batch 32

The model is a GPT-2 of random weights (sae.models.weights.RandomWeights) with the shape of lm-train's LM
(conf/lm_train.yaml, sae/lm/config.py: d_model 128, 4 heads, ReLU MLP of 512, BPE vocab 1024, n_ctx 128; no
checkpoint needed), traced with a random TopK CLT (random_transcoders, decoder rows of norm --out-norm; at
0.1 its writes have about the norm of this model's MLP outputs, ~0.8). For each length P: P random tokens,
one warm-up `attribute` (compile) and --repeats timed ones (`attribute` returns numpy arrays, so it is
synchronous). Prints one JSON line per length:

  prompt_length        P, the prompt's tokens
  padded_length        the positions the replacement model runs (P rounded up to a multiple of 16)
  n_layers, d_model, n_heads, d_mlp, vocab_size, n_ctx    the model's shape
  features_per_layer   F of the CLT;  k: its TopK active features per layer and position
  batch                target rows per vector-Jacobian call (attribute's `batch`)
  out_norm             the CLT's decoder-row norm
  repeats              timed calls
  attribute_s          median seconds of one `attribute` call (one graph)
  first_call_s         seconds of the warm-up call: compilation + one graph
  prune_scores_s       median seconds of prune(graph) + scores(graph, pruned)
  n_features_active    active feature nodes (len(graph.features))
  n_nodes              graph nodes (len(graph.adjacency)): features, L·P errors, P tokens, logits
  n_logits             target logits;  n_targets: n_features_active + n_logits (the rows computed)
  replacement_score, completeness_score   scores(graph, pruned) of the last graph (a sanity check)
  median_over_first    attribute_s ÷ the first length's attribute_s
  loadavg              /proc/loadavg's 1, 5 and 15 minute load averages after the case (null if unreadable)
  backend, devices     jax.default_backend() and str() of jax.devices()
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from sae.circuits import attribute, prune, random_transcoders, replacement, scores
from sae.models.base import FAMILIES
from sae.models.weights import RandomWeights


def load_average() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def build_model(n_layers: int, d_model: int, n_heads: int, d_mlp: int, vocab: int, n_ctx: int, seed: int = 0):
    """A GPT-2 of random weights laid out as lm-train's LM (ReLU MLP, untied unembedding)."""
    family = FAMILIES["gpt2"]
    config = family.config(
        {
            "model_type": "gpt2",
            "n_layer": n_layers,
            "n_embd": d_model,
            "n_head": n_heads,
            "n_inner": d_mlp,
            "vocab_size": vocab,
            "n_positions": n_ctx,
            "activation_function": "relu",
            "tie_word_embeddings": False,
        }
    )
    return family.build(config, RandomWeights(seed))


def benchmark(model, length: int, features: int, k: int, batch: int, repeats: int, out_norm: float, seed: int) -> dict:
    config = model.config
    tokens = np.random.default_rng((seed, length)).integers(0, config.vocab_size, length)
    tc = random_transcoders(config, features, "topk", k, out_norm=out_norm, seed=seed)
    start = time.perf_counter()
    attribute(model, tc, tokens, batch=batch)
    first_call_s = time.perf_counter() - start
    attribute_times, prune_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        graph = attribute(model, tc, tokens, batch=batch)
        attribute_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        pruned = prune(graph)
        graph_scores = scores(graph, pruned)
        prune_times.append(time.perf_counter() - start)
    n_active, n_logits = len(graph.features), len(graph.logit_tokens)
    return {
        "prompt_length": length,
        "padded_length": replacement(model, tc).padded_length(length),
        "n_layers": config.n_layers,
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "d_mlp": config.d_mlp,
        "vocab_size": config.vocab_size,
        "n_ctx": config.n_ctx,
        "features_per_layer": features,
        "k": k,
        "batch": batch,
        "out_norm": out_norm,
        "repeats": repeats,
        "attribute_s": statistics.median(attribute_times),
        "first_call_s": first_call_s,
        "prune_scores_s": statistics.median(prune_times),
        "n_features_active": n_active,
        "n_nodes": len(graph.adjacency),
        "n_logits": n_logits,
        "n_targets": n_active + n_logits,
        "replacement_score": graph_scores["replacement"],
        "completeness_score": graph_scores["completeness"],
        "loadavg": load_average(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32,64,128", help="comma-separated prompt lengths (≤ --n-ctx)")
    parser.add_argument("--features", type=int, default=4096, help="CLT features per layer")
    parser.add_argument("--k", type=int, default=16, help="TopK's active features per layer and position")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--d-mlp", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--n-ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed attribute calls per length")
    parser.add_argument("--batch", type=int, default=32, help="target rows per vector-Jacobian call")
    parser.add_argument("--out-norm", type=float, default=0.1, help="the CLT's decoder-row norm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    if any(not 1 <= n <= args.n_ctx for n in lengths):
        parser.error(f"--lengths must be between 1 and --n-ctx={args.n_ctx}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    model = build_model(args.layers, args.d_model, args.n_heads, args.d_mlp, args.vocab, args.n_ctx, args.seed)
    first = None
    for length in lengths:
        line = benchmark(model, length, args.features, args.k, args.batch, args.repeats, args.out_norm, args.seed)
        first = first or line["attribute_s"]
        line["median_over_first"] = line["attribute_s"] / first
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
