"""`sae-attribute`: the attribution graph of a prompt, pruned, scored and written with its viewer.

    sae-attribute clt=CLT_RUN prompt='def area(self' out=GRAPH_DIR [node_threshold=0.8] [edge_threshold=0.98]
    sae-attribute clt=CLT_RUN prompts=PROMPTS.txt out=GRAPHS_DIR      # one graph per line, a summary table

clt: a cross-layer transcoder run, or per-layer transcoder runs separated by commas (layer 0 first). The
model is the one the run's activation store was cached from (lm=LM_DIR to give another); the prompt is
tokenized as the store's rows were (its template's prefix first). Other keys: max_logits (10), desired_prob
(0.95), batch (32 targets per vector-Jacobian call).

GRAPH_DIR gets graph.json (circuit-tracer's schema), scores.json and index.html; with prompts=, GRAPHS_DIR
gets one such directory per line (000, 001, …) and summary.md / summary.json. A user mistake ends the
command with one line naming the key, file or value (exit status 2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sae.cli import run_job
from sae.errors import ConfigError, DataError

USAGE = (
    "sae-attribute clt=CLT_RUN (prompt=TEXT | prompts=FILE) out=DIR [node_threshold=0.8] [edge_threshold=0.98] "
    "[lm=LM_DIR] [max_logits=10] [desired_prob=0.95] [batch=32]"
)
DEFAULTS = {
    "clt": None,
    "prompt": "",
    "prompts": "",
    "out": None,
    "node_threshold": "0.8",
    "edge_threshold": "0.98",
    "lm": "",
    "max_logits": "10",
    "desired_prob": "0.95",
    "batch": "32",
}


def _number(args: dict, key: str, kind=float):
    try:
        return kind(args[key])
    except ValueError:
        raise ConfigError(f"{key}={args[key]!r}: expected a {kind.__name__}") from None


def model_source(tc) -> tuple[Path, list[int]]:
    """(the model directory, the template's prefix tokens) of the store the transcoders were trained on."""
    from sae.circuits.transcoders import sae_dir
    from sae.data.store import Store
    from sae.inspect.dictionary import load_dictionary, run_config

    hint = "give the model's directory with lm=LM_DIR"
    data = (run_config(load_dictionary(sae_dir(Path(tc.names[0])))).get("data")) or {}
    if not data.get("path"):
        raise DataError(f"clt={tc.names[0]}: its config records no activation store to find the model by; {hint}")
    path = Path(data["path"])
    store = path / tc.input_sites[0] if (path / tc.input_sites[0]).is_dir() else path
    try:
        provenance = Store(store).provenance
    except (DataError, FileNotFoundError) as err:
        raise DataError(f"clt={tc.names[0]}: its store could not be opened ({err}); {hint}") from None
    if provenance.get("source") != "hf" or not provenance.get("model"):
        raise DataError(f"clt={tc.names[0]}: its store '{store}' was not cached from a model (source=hf); {hint}")
    prefix = list((provenance.get("template") or {}).get("prefix") or [])
    return Path(provenance["model"]), prefix


def graph_of(model, tokenizer, tc, prompt: str, prefix: list[int], out: Path, options: dict, scan: str) -> dict:
    """Attribute, prune, score and write one prompt's graph to `out`; its scores.json as a dict."""
    import numpy as np

    from sae.circuits import attribute, prune, scores
    from sae.circuits.files import feature_browsers, graph_json, write_graph

    if not prompt.strip():
        raise ConfigError("the prompt is empty: give prompt=TEXT with at least one token")
    tokens = np.asarray([*prefix, *tokenizer.encode(prompt).tolist()], np.int32)
    start = time.perf_counter()
    graph = attribute(model, tc, tokens, options["max_logits"], options["desired_prob"], options["batch"])
    attributed = time.perf_counter() - start
    pruned = prune(graph, options["node_threshold"], options["edge_threshold"])
    result = {
        "prompt": prompt,
        "tokens": len(tokens),
        "unpruned": {**scores(graph), "nodes": len(graph.adjacency), "edges": int((graph.adjacency != 0).sum())},
        "pruned": {**scores(graph, pruned), "nodes": int(pruned.node_mask.sum()), "edges": int(pruned.edge_mask.sum())},
        "node_threshold": pruned.node_threshold,
        "edge_threshold": pruned.edge_threshold,
        "top_logit": tokenizer.decode([int(graph.logit_tokens[0])]),
        "top_prob": float(graph.logit_probs[0]),
        "seconds": {"attribution": attributed, "total": time.perf_counter() - start},  # attribute + prune + scores
    }
    strings = [tokenizer.decode([int(t)]) for t in [*graph.prompt_tokens, *graph.logit_tokens]]
    extra = {"scores": result, "feature_browsers": feature_browsers(tc.names, out)}
    data = graph_json(graph, pruned, strings, prompt, out.name, scan, extra)
    write_graph(out, data, result)
    return result


def summary_table(results: list[dict]) -> str:
    columns = ["#", "prompt", "top logit", "replacement", "completeness", "pruned replacement", "pruned completeness"]
    lines = ["| " + " | ".join([*columns, "nodes kept"]) + " |", "|" + "---|" * 8]
    for i, r in enumerate(results):
        u, p = r["unpruned"], r["pruned"]
        lines.append(
            f"| {i:03d} | `{r['prompt'][:40]!r}` | {r['top_logit']!r} ({r['top_prob']:.2f}) "
            f"| {u['replacement']:.3f} | {u['completeness']:.3f} | {p['replacement']:.3f} | {p['completeness']:.3f} "
            f"| {p['nodes']} / {u['nodes']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    items = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in items):
        print(__doc__.strip())
        sys.exit(0)

    def job():
        from sae.steer.cli import key_values

        args = key_values(items, DEFAULTS, USAGE)
        if bool(args["prompt"]) == bool(args["prompts"]):
            raise ConfigError(f"give exactly one of prompt=TEXT or prompts=FILE: {USAGE}")
        from sae.circuits.graph import check_threshold

        options = {
            "node_threshold": check_threshold("node_threshold", _number(args, "node_threshold")),
            "edge_threshold": check_threshold("edge_threshold", _number(args, "edge_threshold")),
            "max_logits": _number(args, "max_logits", int),
            "desired_prob": check_threshold("desired_prob", _number(args, "desired_prob")),
            "batch": _number(args, "batch", int),
        }
        if options["max_logits"] < 1 or options["batch"] < 1:
            raise ConfigError("max_logits and batch must be at least 1")
        prompts = [args["prompt"]]
        if args["prompts"]:
            path = Path(args["prompts"])
            if not path.is_file():
                raise ConfigError(f"prompts={path}: no such file (one prompt per line)")
            prompts = [line for line in path.read_text().splitlines() if line.strip()]
            if not prompts:
                raise ConfigError(f"prompts={path}: the file has no prompts (one per line)")

        from sae.circuits.transcoders import load_transcoders
        from sae.models import load

        runs = [r for r in args["clt"].split(",") if r]
        for run in runs:
            if not Path(run).is_dir():
                raise ConfigError(f"clt={run}: no such run directory")
        tc = load_transcoders(runs if len(runs) > 1 else runs[0])
        lm, prefix = (Path(args["lm"]), []) if args["lm"] else model_source(tc)
        if not (lm / "config.json").is_file():
            raise ConfigError(f"lm={lm}: not a model directory (no config.json)")
        model, tokenizer = load(lm)
        tc.check(model)
        for prompt in prompts:  # every prompt's length is checked before any graph is written
            n = len(prefix) + len(tokenizer.encode(prompt))
            if n > model.config.n_ctx:
                raise ConfigError(
                    f"the prompt {prompt[:40]!r} has {n} tokens; the model's context is {model.config.n_ctx}"
                )
        out = Path(args["out"])
        if args["prompt"]:
            r = graph_of(model, tokenizer, tc, prompts[0], prefix, out, options, lm.name)
            print(
                f"{out}: {r['pruned']['nodes']} of {r['unpruned']['nodes']} nodes kept; replacement "
                f"{r['unpruned']['replacement']:.3f} (pruned {r['pruned']['replacement']:.3f}), completeness "
                f"{r['unpruned']['completeness']:.3f} (pruned {r['pruned']['completeness']:.3f}); "
                f"{r['seconds']['total']:.1f} s; open {out / 'index.html'}"
            )
            return
        results = []
        for i, prompt in enumerate(prompts):
            results.append(graph_of(model, tokenizer, tc, prompt, prefix, out / f"{i:03d}", options, lm.name))
        (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "summary.md").write_text(summary_table(results))
        print(f"{out}: {len(results)} graphs; summary in {out / 'summary.md'}")

    sys.exit(run_job(job))
