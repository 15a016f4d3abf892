"""How immediate probing feels: seconds per edit and per drivers request of the probe app's handlers.

  python scripts/benchmark_probe.py [--run SAE_RUN] [--tokens 127] [--repeats 20] [--out FILE]

Without --run: a random one-layer LM of the stdlib LM's shape (d_model 128, 4 heads, ReLU MLP 512, n_ctx
128, vocab 1024, `sae.models.gpt2` with `RandomWeights`) and a random TopK SAE (k 24, 4096 latents) on
blocks.0.mlp.hook_post. With --run: that sae-train run and the model its store came from (`open_probe`).
Times, after a first call that compiles (reported apart), the app's request handlers without HTTP (`App`):

- edit: one random token of a --tokens-token text replaced, then /api/activations on the new text and
  /api/diff against the previous one (what the page sends on every edit);
- drivers: /api/drivers at the text's last token for its strongest feature (leave-one-out over every
  earlier token, batched, and gradient × input);
- generate: /api/generate of 32 tokens with one feature clamped (default + steered continuations).

With --run, it also reports the drivers of the feature strongest at `self` as a method's first parameter
(after `def name(`) on three methods: each earlier token's leave-one-out and gradient × input top driver.
Prints ONE JSON object: medians and minima in seconds, the settings, jax version, devices and `uptime`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from sae.architectures import FAMILIES, make_sae
from sae.export import load_sae
from sae.steer.app import App
from sae.steer.probe import Probe, open_probe

SELF_TEXTS = [
    "class Parser:\n    def parse(self, data):\n        return data\n",
    "    def close(self):\n        self.file.close()\n",
    "class Reader(object):\n\n    def read(self, size=-1):\n        return self.buffer[:size]\n",
]


def random_probe(tmp: str) -> Probe:
    """The stdlib LM's shape with random weights and a random TopK SAE (4096 latents) at its MLP."""
    from sae.export import export_sae
    from sae.lm.config import LMModelConfig
    from sae.lm.text import train_tokenizer
    from sae.lm.train import build

    tokenizer = train_tokenizer([open(__file__).read()] * 4, 1024)
    model = build(LMModelConfig(n_layers=1, d_model=128, n_heads=4, d_mlp=512, n_ctx=128), tokenizer)
    sae = make_sae(FAMILIES["topk"].config(d_sae=4096, k=24), 512)
    params = sae.init_params(jax.random.PRNGKey(0), jnp.zeros(512))
    export_sae(f"{tmp}/sae", sae, params, sae.init_buffers(), 1.0)
    return Probe(model, tokenizer, load_sae(f"{tmp}/sae"), "blocks.0.mlp.hook_post")


def timed(fn, repeats: int) -> dict:
    first = time.perf_counter()
    fn(0)
    first = time.perf_counter() - first
    times = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return {"first_s": round(first, 4), "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}


def self_drivers(probe: Probe) -> list[dict]:
    out = []
    for text in SELF_TEXTS:
        r = probe.activations(text)
        pos = next(i for i, s in enumerate(r.strings) if s.strip() == "self" and r.strings[i - 1].endswith("("))
        feature = int(np.argmax(r.codes[pos]))
        d = probe.drivers(text, feature, pos)
        loo, gxi = int(np.nanargmax(d.leave_one_out)), int(np.argmax(d.grad_x_input[:pos]))
        out.append(
            {
                "context": "".join(r.strings[max(0, pos - 4) : pos + 1]),
                "feature": feature,
                "value": round(d.value, 4),
                "leave_one_out_top": [r.strings[loo], round(float(d.leave_one_out[loo]), 4)],
                "grad_x_input_top": [r.strings[gxi], round(float(d.grad_x_input[gxi]), 4)],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=None)
    parser.add_argument("--tokens", type=int, default=127)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = open_probe(args.run) if args.run else random_probe(tmp)
        app = App(probe)
        rng = np.random.default_rng(0)
        vocab = probe.model.config.vocab_size
        texts = [rng.integers(3, min(vocab, len(probe.vocab)), args.tokens)]
        for _ in range(args.repeats + 1):
            edited = texts[-1].copy()
            edited[rng.integers(0, args.tokens)] = rng.integers(3, min(vocab, len(probe.vocab)))
            texts.append(edited)
        as_text = [probe.tokenizer.decode(t) for t in texts]

        def edit(i):
            app.activations({"text": as_text[i + 1], "features": [0, 1, 2]})
            app.diff({"before": as_text[i], "after": as_text[i + 1]})

        def drivers(i):
            r = probe.activations(as_text[i])
            n = len(r.ids) - 1
            app.drivers({"text": as_text[i], "feature": int(np.argmax(r.codes[n])), "position": n})

        def generate(i):
            item = {"feature": 0, "op": "clamp", "value": 2.0 + i}
            app.generate({"text": as_text[i][:200], "interventions": [item], "max_new_tokens": 32})

        result = {
            "model": "random stdlib-LM shape" if not args.run else str(args.run),
            "d_sae": probe.sae.d_sae,
            "site": probe.site,
            "text_tokens": int(len(probe.activations(as_text[0]).ids)),
            "edit": timed(edit, args.repeats),
            "drivers": timed(drivers, args.repeats),
            "generate_32": timed(generate, max(3, args.repeats // 4)),
            "repeats": args.repeats,
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        }
        if args.run:
            result["self_drivers"] = self_drivers(probe)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        open(args.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
