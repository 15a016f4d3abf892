"""The static feature browser: `index.html` (inline CSS and JS), `features.js` and `data/chunk_*.js`.

The page itself is package data in `sae/inspect/static/`: `browser.html` (the skeleton, with `/*CSS*/` and
`/*JS*/` placeholders), `browser.css` and `browser.js` (the app). `write_site` inlines the two into the
skeleton, so `index.html` is one self-contained file; this module only writes the data.

It opens from the file system with no network: Chromium refuses fetch() of file:// JSON, so data is
JavaScript that calls a global hook, loaded with <script src>. `features.js` holds the feature list as
columns (id, density, mean, max, top token, label, ground-truth match; a CLT's layer); the list is filtered,
sorted and paginated in the page, so 16k features stay responsive. A feature's details (histogram, examples
with their token context, neighbours; a CLT feature's decoder norm into each layer) sit in
`data/chunk_NNNNN.js` with `chunk_features` features each, loaded when one of its features is opened.
State lives in the URL hash: `#q=TEXT&sort=KEY&dir=asc|desc&page=N` for the list and `#f=ID` for a
feature, so views can be linked and tested.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

import numpy as np

from sae.inspect.report import Inspection


def _num(x: float, digits: int = 4) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


def _js(hook: str, payload) -> str:
    return f"{hook}({json.dumps(payload, separators=(',', ':'))});\n"


def _feature_list(insp: Inspection) -> dict:
    d = insp.d_sae
    columns = {
        "density": [_num(v) for v in insp.density],
        "mean": [_num(v) for v in insp.mean_activation],
        "max": [_num(v) for v in insp.max_activation],
        "token": [insp.top_token(i) for i in range(d)] if insp.has_tokens else None,
        "label": [insp.labels.get(i, "") for i in range(d)],
    }
    if insp.has_ground_truth:
        columns["gt"] = insp.arrays["gt_match"].tolist()
        columns["gt_cos"] = [_num(v, 3) for v in insp.arrays["gt_cosine"]]
    if insp.has_layers:
        columns["layer"] = [insp.layer(i) for i in range(d)]
    return columns


def _example(insp: Inspection, ex, table: dict[str, int]) -> list:
    item = [ex.row, _num(ex.value), _num(ex.quantile, 3)]
    if ex.tokens is not None:
        item += [[table.setdefault(t, len(table)) for t in ex.tokens], [_num(v, 3) for v in ex.values], ex.centre]
    return item


def _chunk(insp: Inspection, lo: int, hi: int) -> dict:
    table: dict[str, int] = {}
    features = []
    for i in range(lo, hi):
        f = insp.feature(i)
        nz = np.flatnonzero(f.hist_counts)
        a, b = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        item = {
            "id": i,
            "fires": f.fires,
            "hist": [a, f.hist_counts[a:b].tolist()],
            "top": [_example(insp, e, table) for e in f.top],
            "rnd": [_example(insp, e, table) for e in f.random],
            "nb": [[int(j), _num(c, 3)] for j, c in zip(f.neighbours, f.neighbour_cosines)],
        }
        if f.decoder_layer_norms is not None:
            item["dn"] = [_num(v) for v in f.decoder_layer_norms]  # into layers 0..L−1 (0 before f.layer)
        features.append(item)
    return {"tokens": list(table), "features": features}


def write_site(insp: Inspection, out_dir: str | Path, page_size: int = 100, chunk_features: int = 64) -> Path:
    """Write the browser into out_dir; returns the path of index.html."""
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for old in (out / "data").glob("chunk_*.js"):
        old.unlink()
    meta = {
        "run": str(insp.meta.get("run", "")),
        "description": insp.meta.get("description", ""),
        "n_rows": insp.n_rows,
        "d_sae": insp.d_sae,
        "d_in": insp.meta.get("d_in"),
        "d_out": insp.meta.get("d_out", insp.meta.get("d_in")),
        "architecture": insp.meta.get("architecture", ""),
        "kind": insp.meta.get("kind", "sae"),
        "dictionary": insp.meta.get("dictionary", ""),
        "n_layers": insp.meta.get("n_layers"),
        "features_per_layer": insp.meta.get("features_per_layer"),
        "has_tokens": insp.has_tokens,
        "has_gt": insp.has_ground_truth,
        "edges": [_num(e) for e in insp.arrays["hist_edges"]],
        "dead": len(insp.dead),
        "ultra_low": len(insp.ultra_low_density),
        "ultra_low_density": insp.meta["ultra_low_density"],
        "chunk": chunk_features,
        "page_size": page_size,
        "plots": sorted(p.name for p in insp.plots.values()),
        "recovery": insp.mmcs(),
    }
    (out / "features.js").write_text(_js("SAE_LIST", {"meta": meta, "columns": _feature_list(insp)}))
    for c, lo in enumerate(range(0, insp.d_sae, chunk_features)):
        payload = {"chunk": c, **_chunk(insp, lo, min(lo + chunk_features, insp.d_sae))}
        (out / "data" / f"chunk_{c:05d}.js").write_text(_js("SAE_CHUNK", payload))
    index = out / "index.html"
    index.write_text(_index_html())
    return index


def _index_html() -> str:
    """static/browser.html with static/browser.css and static/browser.js inlined at their placeholders."""
    static = files("sae.inspect") / "static"
    read = lambda name: (static / name).read_text(encoding="utf-8")
    return read("browser.html").replace("/*CSS*/", read("browser.css")).replace("/*JS*/", read("browser.js"))
