"""A graph's files: `graph.json` in circuit-tracer's schema (the one Neuronpedia's graph viewer reads:
`metadata`, `qParams`, `nodes`, `links`; circuit-tracer `frontend/graph_models.py`), `scores.json`, and
`index.html`, the offline viewer (static/graph.html with the graph inlined; no network).

Node ids as circuit-tracer writes them: a feature `{layer}_{feature}_{position}`, an error
`{layer}_-1_{position}`, a token `E_{token id}_{position}`, a logit `{L + 1}_{token id}_{position}`. The
graph holds the pruned nodes and edges; each node's `influence` is its cumulative share of the influence on
the logits (nodes are kept in that order) and a feature's `activation` its activation.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from pathlib import Path

import numpy as np

from sae.circuits.graph import Graph, Pruned


def cantor(x: int, y: int) -> int:
    """circuit-tracer's single number for (layer, feature)."""
    return (x + y) * (x + y + 1) // 2 + y


def node_records(graph: Graph, pruned: Pruned, token_strings: list[str]) -> list[dict]:
    """Every node of the graph (kept or not) as a circuit-tracer node record, in the graph's node order."""
    n_pos, n_layers = graph.n_pos, graph.n_layers
    out = []
    for (layer, pos, feature), a in zip(graph.features.tolist(), graph.activations.tolist()):
        out.append(
            dict(
                node_id=f"{layer}_{feature}_{pos}",
                feature=cantor(layer, feature),
                layer=str(layer),
                ctx_idx=pos,
                feature_type=graph.kind,
                jsNodeId=f"{layer}_{feature}-0",
                activation=a,
            )
        )
    for layer in range(n_layers):
        for pos in range(n_pos):
            out.append(
                dict(
                    node_id=f"{layer}_-1_{pos}",
                    feature=-1,
                    layer=str(layer),
                    ctx_idx=pos,
                    feature_type="mlp reconstruction error",
                    jsNodeId=f"{layer}_-1-{pos}",
                )
            )
    for pos, token in enumerate(graph.prompt_tokens.tolist()):
        out.append(
            dict(
                node_id=f"E_{token}_{pos}",
                feature=pos,
                layer="E",
                ctx_idx=pos,
                feature_type="embedding",
                jsNodeId=f"E_{token}-{pos}",
                clerp=token_strings[pos],
            )
        )
    last, top = n_pos - 1, int(np.argmax(graph.logit_probs))
    for i, (token, p) in enumerate(zip(graph.logit_tokens.tolist(), graph.logit_probs.tolist())):
        shown = token_strings[n_pos + i]
        out.append(
            dict(
                node_id=f"{n_layers + 1}_{token}_{last}",
                feature=token,
                layer=str(n_layers + 1),
                ctx_idx=last,
                feature_type="logit",
                token_prob=p,
                is_target_logit=i == top,
                jsNodeId=f"L_{token}-{last}",
                clerp=f'Output "{shown}" (p={p:.3f})',
            )
        )
    for record, influence in zip(out, pruned.cumulative.tolist()):
        record.update(run_idx=0, reverse_ctx_idx=0, influence=influence)
        record.setdefault("clerp", "")
        record.setdefault("token_prob", 0.0)
        record.setdefault("is_target_logit", False)
    return out


def graph_json(
    graph: Graph,
    pruned: Pruned,
    token_strings: list[str],
    prompt: str,
    slug: str,
    scan: str,
    extra: dict | None = None,
) -> dict:
    """The pruned graph in circuit-tracer's schema. token_strings: the prompt's tokens then the target
    logits' tokens as text. `extra` goes into metadata (the viewer's links to feature browsers, the scores)."""
    records = node_records(graph, pruned, token_strings)
    kept = np.flatnonzero(pruned.node_mask)
    targets, sources = np.nonzero(pruned.edge_mask)
    links = [
        {"source": records[s]["node_id"], "target": records[t]["node_id"], "weight": float(graph.adjacency[t, s])}
        for t, s in zip(targets.tolist(), sources.tolist())
    ]
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": list(graph.names),
        "prompt_tokens": token_strings[: graph.n_pos],
        "prompt": prompt,
        "node_threshold": pruned.node_threshold,
        "schema_version": 1,
        "n_layers": graph.n_layers,
        "features_per_layer": graph.n_features,
        **(extra or {}),
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": [records[i] for i in kept], "links": links}


def feature_browsers(names: tuple[str, ...], out_dir: Path) -> list[str | None]:
    """Per transcoder run, the relative address of its sae-inspect browser (RUN/inspect/index.html) from
    out_dir, or None where it has not been built."""
    found = []
    for name in names:
        run = Path(name).parent if Path(name).name == "sae" else Path(name)
        page = run / "inspect" / "index.html"
        found.append(os.path.relpath(page.resolve(), out_dir.resolve()) if page.is_file() else None)
    return found


def write_graph(out_dir: str | Path, data: dict, scores: dict) -> Path:
    """out_dir/graph.json, scores.json and index.html (the viewer, with `data` inlined)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "graph.json").write_text(json.dumps(data) + "\n")
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    inline = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = files("sae.circuits").joinpath("static/graph.html").read_text()
    (out_dir / "index.html").write_text(page.replace("/*GRAPH*/", f"const GRAPH = {inline};"))
    return out_dir
