"""Caching throughput of sae.models against transformers (torch) on a GPT-2-small-shaped random checkpoint.

  python scripts/benchmark_models.py [--site blocks.5.hook_resid_post] [--batch 8] [--n-ctx 128] [--repeats 5]
      [--dtype float32|bfloat16] [--device cpu|cuda] [--out FILE]

Builds transformers' GPT2LMHeadModel(GPT2Config()) (12 layers, d_model 768, 12 heads, vocab 50257, 1024
positions; torch.manual_seed(0)) in a temp dir and times, in the same run, the work of caching one site for
random tokens [batch, n_ctx], each brought to the host as a numpy array:

- ours: `sae.models.load_model(dir, dtype)` and a `jax.jit` over its `nnx.split` state returning only the
  captured site (as `HFRows.chunks` does; XLA drops the logits and the blocks after the site), on
  jax.devices()[0]. The first call (compile) is not timed.
- torch_full: `model.eval()`, `torch.inference_mode()`, a forward hook on `transformer.h[L]` keeping its
  output; the whole forward runs (logits included). float32, `torch.set_num_threads(os.cpu_count())`.
- torch_truncated: the same with `transformer.h` cut to its first L+1 blocks and the forward stopped by the
  hook (what TransformerLens' `stop_at_layer` does): the work ours does.

Prints ONE JSON object: tokens_per_s and median seconds per batch of each (`--repeats` timed calls, in
alternation), ratios ours / torch_*, the settings, jax / torch versions, devices and the `uptime` line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from sae.models import load_model


class Stop(Exception):
    """Raised by the truncated run's hook once the site is captured."""


def torch_runner(model, layer: int, tokens: torch.Tensor, stop: bool):
    got = {}

    def hook(_module, _args, out):
        got["x"] = out[0] if isinstance(out, tuple) else out
        if stop:
            raise Stop

    model.transformer.h[layer].register_forward_hook(hook)

    def run():
        with torch.inference_mode():
            try:
                model(tokens)
            except Stop:
                pass
        return got.pop("x").float().cpu().numpy()

    return run


def medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each fn, after one untimed call, timed in alternation so machine noise hits all alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="blocks.5.hook_resid_post")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="ours only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch's device")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch has no CUDA device here")
    layer = int(args.site.split(".")[1])
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.n_ctx)).astype(np.int32)
    t_tokens = torch.as_tensor(tokens, dtype=torch.long, device=args.device)

    with tempfile.TemporaryDirectory(prefix="benchmark_models_") as tmp:
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp)
        model = load_model(tmp, args.dtype)
        full = transformers.GPT2LMHeadModel.from_pretrained(tmp).to(args.device).eval()
        cut = transformers.GPT2LMHeadModel.from_pretrained(tmp).to(args.device).eval()
    cut.transformer.h = cut.transformer.h[: layer + 1]
    graphdef, state = nnx.split(model)
    site = args.site

    @jax.jit
    def acts(state, tokens):
        return nnx.merge(graphdef, state)(tokens, capture=[site])[1][site]

    def ours():
        return np.asarray(acts(state, tokens))

    fns = {
        "ours": ours,
        "torch_full": torch_runner(full, layer, t_tokens, stop=False),
        "torch_truncated": torch_runner(cut, layer, t_tokens, stop=True),
    }
    ref = fns["torch_full"]()
    agree = float(np.abs(ours().astype(np.float32) - ref).max())  # compiles ours; a check that both read one site
    seconds = medians(fns, args.repeats)
    n_tokens = args.batch * args.n_ctx
    uptime = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    result = {
        "tokens_per_s": {name: n_tokens / s for name, s in seconds.items()},
        "seconds_per_batch": seconds,
        "ours_over_torch_full": seconds["torch_full"] / seconds["ours"],
        "ours_over_torch_truncated": seconds["torch_truncated"] / seconds["ours"],
        "max_abs_diff_vs_torch": agree,
        "settings": {**vars(args), "model": "gpt2-small shape, random (torch.manual_seed(0))"},
        "jax": jax.__version__,
        "jax_device": str(jax.devices()[0]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "uptime": uptime,
    }
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
