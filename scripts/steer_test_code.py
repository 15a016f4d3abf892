"""A trait with no judge model, "writes test code", on a stdlib LM: `python scripts/steer_test_code.py out=DIR`.

Stages (each skipped when its output exists):
  1. lm-train            DIR/lm        the one-layer LM on the stdlib *with* its tests, each file headed by
                                       its path ('# Lib/test/test_json.py'), so the model can tell them apart
  2. texts               DIR/texts     from the LM's own training files: after each sampled `def` line, the
                                       header and the 4 lines before the def as the prompt and the next 8
                                       lines as the response; positive.jsonl from Lib/test/, negative.jsonl
                                       from the library (the same number); prompts.txt from held-out files
                                       (half tests, half library: header + the lines up to a def)
  3. sae-steer extract   DIR/direction the mean difference over the response tokens at every residual site
  4. sae-steer sweep     DIR/sweep     the site chosen by score moved per loss increase, the α sweep of the
                                       share of generated lines that are assertions, the loss, monitoring

Keys: out (required); lm=RUN (reuse an lm-train run whose corpus has the header); lm_steps (1000);
n_examples (per side, 256); n_prompts (96); alphas; max_new_tokens (48).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from walkthrough import command, lm_stage, parse, workspace

USAGE = "python scripts/steer_test_code.py out=DIR"
HEADER = "# Lib/{id}"
EXCLUDE = "[site-packages,dist-packages,idle_test,tokenizedata,encoded_modules,test_source_encoding.py]"
DEFAULTS = {
    "out": None,
    "lm": None,
    "lm_steps": "1000",
    "n_examples": "256",
    "n_prompts": "96",
    "alphas": "[-8,-4,-2,0,2,4,8]",
    "max_new_tokens": "48",
}
MAX_PROMPT_CHARS = 180
DEF = re.compile(r"\s*def \w+\(")


def cuts(text: str, rng: np.random.Generator, n: int, before: int, after: int) -> list[tuple[str, str]]:
    """Up to n (prompt, response) pairs of a document: its header line and the `before` lines up to a def
    line; the `after` lines following it."""
    lines = text.split("\n")
    header, body = lines[0], lines[1:]
    defs = [i for i, line in enumerate(body) if DEF.match(line) and i + 1 < len(body)]
    chosen = sorted(rng.choice(defs, min(n, len(defs)), replace=False)) if defs else []
    out = []
    for i in chosen:
        prompt = "\n".join([header, *body[max(0, i - before) : i + 1]]) + "\n"
        response = "\n".join(body[i + 1 : i + 1 + after])
        if len(prompt) <= MAX_PROMPT_CHARS and (response.strip() or not after):  # ~70 tokens: room for a response
            out.append((prompt, response))
    return out


def write_texts(lm: Path, out: Path, n_examples: int, n_prompts: int) -> dict:
    """positive.jsonl, negative.jsonl and prompts.txt from the LM's own corpus (its lm_config.json)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from sae.lm.train import corpus_of

    corpus = corpus_of(json.loads((lm / "lm_config.json").read_text()))
    rng = np.random.default_rng(0)
    sides: dict[str, list] = {"positive": [], "negative": []}
    for doc, text in zip(corpus.split("train"), corpus.texts("train")):
        sides["positive" if doc.startswith("test/") else "negative"] += cuts(text, rng, 2, 4, 8)
    n = min(n_examples, *(len(v) for v in sides.values()))
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in sides.items():
        keep = rng.choice(len(pairs), n, replace=False)
        lines = [json.dumps({"prompt": pairs[i][0], "response": pairs[i][1]}) for i in keep]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    held: dict[bool, list] = {True: [], False: []}
    for doc, text in zip(corpus.split("val"), corpus.texts("val")):
        held[doc.startswith("test/")] += [p for p, _ in cuts(text, rng, 3, 4, 0)]
    half = min(n_prompts // 2, len(held[True]), len(held[False]))
    prompts = [p for kind in (True, False) for p in held[kind][:half]]
    (out / "prompts.txt").write_text("\n---\n".join(p.rstrip("\n") for p in prompts) + "\n")
    return {"examples_per_side": n, "prompts": len(prompts)}


def main(argv: list[str]) -> None:
    args = parse(argv, DEFAULTS, USAGE)
    out, logs, timings, save_timings = workspace(args)
    lm = lm_stage(args, out, logs, timings, save_timings, f"corpus.exclude={EXCLUDE}", f"corpus.header='{HEADER}'")
    texts = out / "texts"
    if not (texts / "prompts.txt").exists():
        print(f"[texts] {write_texts(lm, texts, int(args['n_examples']), int(args['n_prompts']))}", flush=True)
    steer = [sys.executable, "-m", "sae.steer.cli"]
    if not (out / "direction" / "direction.json").exists():
        command(
            "sae-steer extract",
            [*steer, "extract", f"lm={lm / 'hf'}", f"positive={texts / 'positive.jsonl'}"]
            + [f"negative={texts / 'negative.jsonl'}", "pooling=response_mean", f"out={out / 'direction'}"],
            timings=timings,
            log=logs / "extract.log",
        )
        save_timings()
    if not (out / "sweep" / "sweep.json").exists():
        command(
            "sae-steer sweep",
            [*steer, "sweep", f"lm={lm / 'hf'}", f"direction={out / 'direction'}", f"alphas={args['alphas']}"]
            + [f"prompts={texts / 'prompts.txt'}", "score=test_code", f"max_new_tokens={args['max_new_tokens']}"]
            + [f"out={out / 'sweep'}"],
            timings=timings,
            log=logs / "sweep.log",
        )
        save_timings()
    print((logs / "sweep.log").read_text().strip().splitlines()[-1])


if __name__ == "__main__":
    main(sys.argv[1:])
