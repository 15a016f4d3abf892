"""Transcoders, skip transcoders and a cross-layer transcoder on a 2-layer stdlib LM, end to end:
`python scripts/transcoders.py out=DIR [key=value ...]`.

Stages (each a command of its own, run as subprocesses and timed; a stage whose output exists is skipped):
  1. lm-train             DIR/lm                  a 2-layer transformer on the Python stdlib (BPE tokens)
  2. sae-cache source=hf  DIR/pairs/<site>        every layer's MLP input (ln2.hook_normalized) and output
                                                  (hook_mlp_out), one pass, the same rows in every store
  3. sae-train            DIR/transcoder_l<l>     a TopK transcoder per layer (data.target = that layer's output)
                          DIR/skip_l<l>           the same with sae.skip=true
                          DIR/clt                 a TopK CLT over both layers (data.layers=all), k per layer
                          DIR/clt_jumprelu        a JumpReLU CLT (the paper's loss)
  4. replacement model    every MLP replaced at once by each stack / CLT on held-out text
Then DIR/results.md and DIR/results.json: per dictionary, FVU per layer and summed, L0 per layer, and the
replacement model's CE-loss score, KL and top-1 agreement with the model. Every TopK dictionary has the same
features per layer (d_sae) and the same k per layer, so the comparison is at equal width and equal L0.

Keys: out (required); lm=RUN (reuse an lm-train run); lm_steps (1000); rows (1000000); tokens (per dictionary,
2000000); d_sae (features per layer, 2048); k (16); l0_coefficient (JumpReLU CLT's λ, 0.03);
eval_sequences (256).
"""

from __future__ import annotations

import json
import sys

from walkthrough import lm_stage, parse, run, timings_table, workspace

USAGE = "python scripts/transcoders.py out=DIR"
N_LAYERS = 2
IN_SITE, OUT_SITE = "ln2.hook_normalized", "hook_mlp_out"

DEFAULTS = {
    "out": None,
    "lm": None,
    "lm_steps": "1000",
    "rows": "1000000",
    "tokens": "2000000",
    "d_sae": "2048",
    "k": "16",
    "l0_coefficient": "0.03",
    "eval_sequences": "256",
}


def sites(layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.{IN_SITE}", f"blocks.{layer}.{OUT_SITE}"


def dictionaries(args: dict[str, str], pairs) -> dict[str, list[str]]:
    """{run name: sae-train overrides} for every dictionary of the comparison."""
    common = [f"sae.d_sae={args['d_sae']}", "data=cached", f"trainer.total_tokens={args['tokens']}"]
    runs = {}
    for layer in range(N_LAYERS):
        x, y = (pairs / site for site in sites(layer))
        per_layer = ["sae=topk", f"sae.k={args['k']}", f"data.path={x}", f"data.target={y}", *common]
        runs[f"transcoder_l{layer}"] = per_layer
        runs[f"skip_l{layer}"] = [*per_layer, "sae.skip=true"]
    runs["clt"] = ["sae=clt", "sae.activation=topk", f"sae.k={args['k']}", f"data.path={pairs}", "data.layers=all"]
    runs["clt"] += common
    runs["clt_jumprelu"] = ["sae=clt", f"sae.l0_coefficient={args['l0_coefficient']}", f"data.path={pairs}"]
    runs["clt_jumprelu"] += ["data.layers=all", "sae.normalize_activations=true", *common]
    return runs


def stack_replacement(pairs, runs: list, eval_sequences: int) -> dict:
    """The model with every layer's MLP output replaced by that layer's transcoder at once."""
    from sae.data.hf import store_replacement
    from sae.export import load_sae

    loaded = [load_sae(run / "sae") for run in runs]
    return store_replacement(
        pairs / sites(0)[0],
        [sites(layer) for layer in range(N_LAYERS)],
        lambda j, inputs: loaded[j](inputs[j]),
        eval_sequences,
    )


def main(argv: list[str]) -> None:
    args = parse(argv, DEFAULTS, USAGE)
    out, logs, timings, save_timings = workspace(args)
    lm = lm_stage(args, out, logs, timings, save_timings, f"model.n_layers={N_LAYERS}")
    corpus = json.loads((lm / "lm_config.json").read_text())["corpus"]
    pairs = out / "pairs"
    all_sites = [site for layer in range(N_LAYERS) for site in sites(layer)]
    if not all((pairs / site / "manifest.json").exists() for site in all_sites):
        run(
            "sae-cache",
            "cache_activations.py",
            "source=hf",
            f"source.path={lm / 'hf'}",
            f"source.sites=[{','.join(all_sites)}]",
            f"source.n_rows={args['rows']}",
            f"corpus.path={corpus['path']}",
            f"corpus.pattern='{corpus['pattern']}'",
            f"corpus.val_fraction={corpus['val_fraction']}",
            f"out={pairs}",
            timings=timings,
            log=logs / "sae_cache.log",
        )
        save_timings()
    metrics = {}
    for name, overrides in dictionaries(args, pairs).items():
        run_dir = out / name
        if not (run_dir / "metrics.json").exists():
            run(
                f"sae-train {name}",
                "train_sae.py",
                *overrides,
                f"hydra.run.dir={run_dir}",
                timings=timings,
                log=logs / f"train_{name}.log",
            )
            save_timings()
        metrics[name] = json.loads((run_dir / "metrics.json").read_text())
    results = {"lm": json.loads((lm / "metrics.json").read_text()), "dictionaries": {}}
    for stack in ("transcoder", "skip"):
        parts = [metrics[f"{stack}_l{layer}"] for layer in range(N_LAYERS)]
        saved = out / f"{stack}_stack_replacement.json"
        if not saved.exists():
            runs = [out / f"{stack}_l{layer}" for layer in range(N_LAYERS)]
            saved.write_text(json.dumps(stack_replacement(pairs, runs, int(args["eval_sequences"])), indent=2))
        replaced = json.loads(saved.read_text())
        results["dictionaries"][f"{stack} stack"] = {
            "fvu_per_layer": [m["fvu"] for m in parts],
            "l0_per_layer": [m["l0"] for m in parts],
            "dead_fraction": sum(m["dead_fraction"] for m in parts) / N_LAYERS,
            **{k: replaced[k] for k in ("ce_loss_score", "kl_div", "top1_agreement")},
            "per_layer_ce_loss_score": [m.get("ce_loss_score") for m in parts],
        }
    for name in ("clt", "clt_jumprelu"):
        m = metrics[name]
        results["dictionaries"][name] = {
            k: m.get(k) for k in ("fvu_per_layer", "l0_per_layer", "dead_fraction", "ce_loss_score", "kl_div")
        }
        results["dictionaries"][name]["top1_agreement"] = m.get("top1_agreement")
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results, args))
    print(table(results, args), flush=True)


def table(results: dict, args: dict[str, str]) -> str:
    lm = results["lm"]
    lines = [
        f"LM: {N_LAYERS} layers, validation loss {lm['val_loss']:.3f} nats/token after {lm['steps']} steps",
        "",
        f"| dictionary (d_sae={args['d_sae']} per layer) | FVU per layer | summed FVU | L0 per layer | dead |"
        " CE-loss score | KL (nats) | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["dictionaries"].items():
        fvu, l0 = m["fvu_per_layer"], m["l0_per_layer"]
        lines.append(
            f"| {name} | {' / '.join(f'{v:.3f}' for v in fvu)} | {sum(fvu):.3f} | {' / '.join(f'{v:.1f}' for v in l0)}"
            f" | {m['dead_fraction']:.3f} | {m['ce_loss_score']:.3f} | {m['kl_div']:.4f} | {m['top1_agreement']:.3f} |"
        )
    return "\n".join(lines + timings_table(results["timings_s"])) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
