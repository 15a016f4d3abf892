"""Towards Monosemanticity at small scale, end to end: `python scripts/monosemanticity.py out=DIR [key=value ...]`.

Stages (each a command of its own, run here as subprocesses and timed; a stage whose output already
exists is skipped, so a rerun after an interruption continues):
  1. lm-train            DIR/lm            the one-layer transformer on the Python stdlib (BPE tokens)
  2. sae-cache source=hf DIR/store         its blocks.0.mlp.hook_post activations (DIR/lm/hf) with token ids
  3. sae-train           DIR/<family>      one SAE per family at d_sae = 8 × d_mlp, data=cached
  4. loss recovered      DIR/<family>/metrics.json gets ce_loss_score and kl_div (if sae-train did not add them)
  5. sae-inspect         DIR/<family>/inspect/index.html
Then DIR/results.md and DIR/results.json: the LM's validation loss and, per SAE, L0, explained variance,
dead fraction, CE-loss score, KL, and the time each stage took.

Keys: out (required); lm=RUN (reuse an lm-train run instead of stage 1); lm_steps (1000); rows (tokens cached,
2000000); sae_tokens (per SAE, 2000000); d_sae (4096); families (topk,batchtopk; any of sae=...); k (24, TopK family);
l0_coefficient (JumpReLU); eval_sequences (validation windows for loss recovered, 256); inspect_rows (262144).
"""

from __future__ import annotations

import json
import sys
import time

from walkthrough import lm_stage, parse, run, timings_table, workspace

USAGE = "python scripts/monosemanticity.py out=DIR"

DEFAULTS = {
    "out": None,
    "lm": None,
    "lm_steps": "1000",
    "rows": "2000000",
    "sae_tokens": "2000000",
    "d_sae": "4096",
    "families": "topk,batchtopk",
    "k": "24",
    "l0_coefficient": "0.3",
    "eval_sequences": "256",
    "inspect_rows": "262144",
}


def sae_overrides(family: str, args: dict[str, str]) -> list[str]:
    extra = {
        "topk": [f"sae.k={args['k']}"],
        "batchtopk": [f"sae.k={args['k']}"],
        "matryoshka": [f"sae.k={args['k']}"],
        "jumprelu": [f"sae.l0_coefficient={args['l0_coefficient']}"],
    }
    return [f"sae={family}", f"sae.d_sae={args['d_sae']}", *extra.get(family, [])]


def main(argv: list[str]) -> None:
    args = parse(argv, DEFAULTS, USAGE)
    out, logs, timings, save_timings = workspace(args)

    lm = lm_stage(args, out, logs, timings, save_timings)
    store = out / "store"
    corpus = json.loads((lm / "lm_config.json").read_text())["corpus"]  # the LM's own text and split
    if not (store / "manifest.json").exists():
        run(
            "sae-cache",
            "cache_activations.py",
            "source=hf",
            f"source.path={lm / 'hf'}",
            "source.sites=[blocks.0.mlp.hook_post]",
            f"source.n_rows={args['rows']}",
            f"corpus.path={corpus['path']}",
            f"corpus.pattern='{corpus['pattern']}'",
            f"corpus.val_fraction={corpus['val_fraction']}",
            f"out={store}",
            timings=timings,
            log=logs / "sae_cache.log",
        )
        save_timings()

    from sae.data.hf import store_loss_recovered
    from sae.export import load_sae

    results = {"lm": json.loads((lm / "metrics.json").read_text()), "saes": {}}
    for family in args["families"].split(","):
        run_dir = out / family
        if not (run_dir / "metrics.json").exists():
            run(
                f"sae-train {family}",
                "train_sae.py",
                *sae_overrides(family, args),
                "data=cached",
                f"data.path={store}",
                f"trainer.total_tokens={args['sae_tokens']}",
                f"hydra.run.dir={run_dir}",
                timings=timings,
                log=logs / f"sae_train_{family}.log",
            )
            save_timings()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if "ce_loss_score" not in metrics:
            t0 = time.perf_counter()
            metrics.update(store_loss_recovered(store, load_sae(run_dir / "sae"), int(args["eval_sequences"])))
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            timings[f"loss recovered {family}"] = time.perf_counter() - t0
            save_timings()
        if not (run_dir / "inspect" / "index.html").exists():
            run(
                f"sae-inspect {family}",
                "inspect_features.py",
                f"run={run_dir}",
                f"rows={args['inspect_rows']}",
                timings=timings,
                log=logs / f"sae_inspect_{family}.log",
            )
            save_timings()
        results["saes"][family] = {
            k: metrics.get(k)
            for k in (
                "l0",
                "explained_variance",
                "fvu",
                "dead_fraction",
                "ce_loss_score",
                "kl_div",
                "ce_loss_clean",
                "ce_loss_sae",
                "ce_loss_zero_ablation",
            )
        }
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results, args))
    print(table(results, args), flush=True)


def table(results: dict, args: dict[str, str]) -> str:
    lm = results["lm"]
    per_byte = f" ({lm['val_loss_per_byte']:.3f} nats/byte)" if "val_loss_per_byte" in lm else ""
    head = f"LM: validation loss {lm['val_loss']:.3f} nats/token{per_byte} after {lm['steps']} steps, "
    lines = [
        head + f"{lm['seconds'] / 60:.1f} min",
        "",
        f"| SAE (d_sae={args['d_sae']}) | L0 | explained variance | dead fraction | CE-loss score | KL (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for family, m in results["saes"].items():
        lines.append(
            f"| {family} | {m['l0']:.1f} | {m['explained_variance']:.3f} | {m['dead_fraction']:.3f} | "
            f"{m['ce_loss_score']:.3f} | {m['kl_div']:.4f} |"
        )
    return "\n".join(lines + timings_table(results["timings_s"])) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
