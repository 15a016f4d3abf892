"""`sae-attribute` end to end on a tiny GPT-2 and a CLT run exported here: graph.json in circuit-tracer's
schema (its pydantic models where installed), scores.json equal to the Python API's, the viewer in headless
Chromium with no network, one graph per line of a prompts file, and one line for each user mistake."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from chromium import Chromium, _chromium
from hf_oracle import tiny_gpt2

from sae.architectures import make_sae
from sae.architectures.clt import CLTConfig
from sae.circuits import attribute, load_transcoders, prune, random_transcoders, scores
from sae.export_clt import export_clt
from sae.models import load

PROMPT = "def area(self"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the model directory, a CLT run of random weights for it)."""
    root = tmp_path_factory.mktemp("attribute")
    lm = tiny_gpt2(root / "lm", n_layer=2, n_positions=32)
    model, _ = load(lm)
    tc = random_transcoders(model.config, 32, "topk", k=4, out_norm=0.05, seed=5)
    clt = make_sae(CLTConfig(d_sae=32, activation="topk", k=4), 32, 32, 2)
    params = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
    params.update({f"W_dec_{layer}": w for layer, w in enumerate(tc.W_dec)})
    export_clt(root / "clt" / "sae", clt, params, 1.0, list(tc.input_sites), list(tc.output_sites), {})
    return lm, root / "clt"


def sae_attribute(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from sae.circuits.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def graph_dir(run, tmp_path_factory):
    lm, clt = run
    out = tmp_path_factory.mktemp("graph") / "area"
    done = sae_attribute(f"clt={clt}", f"prompt={PROMPT}", f"out={out}", f"lm={lm}")
    assert done.returncode == 0, done.stderr
    assert "nodes kept" in done.stdout
    return out


def test_graph_files_match_the_python_api(run, graph_dir):
    lm, clt = run
    model, tokenizer = load(lm)
    tc = load_transcoders(clt)
    tokens = tokenizer.encode(PROMPT)
    graph = attribute(model, tc, tokens)
    pruned = prune(graph)
    saved = json.loads((graph_dir / "scores.json").read_text())
    assert saved["unpruned"]["replacement"] == pytest.approx(scores(graph)["replacement"], abs=1e-6)
    assert saved["pruned"]["completeness"] == pytest.approx(scores(graph, pruned)["completeness"], abs=1e-6)
    assert saved["pruned"]["nodes"] == pruned.node_mask.sum() and saved["unpruned"]["nodes"] == len(graph.adjacency)
    data = json.loads((graph_dir / "graph.json").read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) == pruned.node_mask.sum()
    assert {(link["source"], link["target"]) for link in data["links"]} <= {(s, t) for s in ids for t in ids}
    assert len(data["links"]) == pruned.edge_mask.sum()
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    n = len(tokens)
    assert [n_["node_id"] for n_ in data["nodes"] if n_["feature_type"] == "embedding"] == [
        f"E_{t}_{p}" for p, t in enumerate(tokens.tolist())
    ]
    logits = [n_ for n_ in data["nodes"] if n_["feature_type"] == "logit"]
    assert logits[0]["node_id"] == f"3_{graph.logit_tokens[0]}_{n - 1}" and logits[0]["is_target_logit"]
    # an edge's weight is the adjacency entry of its (target, source)
    layer, pos, feat = graph.features[np.flatnonzero(pruned.node_mask[: len(graph.features)])[0]]
    fid = f"{layer}_{feat}_{pos}"
    j = int(np.flatnonzero((graph.features == [layer, pos, feat]).all(1))[0])
    for link in data["links"]:
        if link["source"] == fid and link["target"].startswith("3_"):
            tok = int(link["target"].split("_")[1])
            row = graph.spans["logits"].start + graph.logit_tokens.tolist().index(tok)
            assert link["weight"] == pytest.approx(float(graph.adjacency[row, j]), rel=1e-6)
    assert data["metadata"]["prompt_tokens"] == [tokenizer.decode([t]) for t in tokens.tolist()]


def test_graph_json_validates_against_circuit_tracers_models(graph_dir):
    models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    models.Model(**json.loads((graph_dir / "graph.json").read_text()))


def test_viewer_renders_offline_and_follows_clicks(graph_dir, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (.ci/run installs Debian's chromium)")
    data = json.loads((graph_dir / "graph.json").read_text())
    feature = max(
        (n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"),
        key=lambda n: sum(link["target"] == n["node_id"] for link in data["links"]),
    )
    incoming = [link for link in data["links"] if link["target"] == feature["node_id"]]
    browser = Chromium(binary, tempfile.mkdtemp(dir=tmp_path))
    try:
        url = (graph_dir / "index.html").as_uri()
        browser.call("Page.navigate", browser.session, url=f"{url}#clicked={feature['node_id']}")
        assert browser.wait_for("document.querySelectorAll('circle.node').length") == len(data["nodes"])
        assert browser.eval("document.querySelectorAll('line.edge').length") == len(data["links"])
        title = browser.wait_for(
            "document.getElementById('clicked-title') && document.getElementById('clicked-title').textContent"
        )
        assert title.startswith(f"feature {feature['node_id'].split('_')[1]} L{feature['layer']}")
        shown = browser.eval("document.querySelectorAll('#details .edges-list')[0].children.length")
        assert shown == min(40, len(incoming))
        strongest = max(incoming, key=lambda link: abs(link["weight"]))["source"]
        assert browser.eval("document.querySelector('#details .edges-list div').dataset.id") == strongest
        scores_text = browser.eval("document.getElementById('scores').textContent")
        assert "replacement" in scores_text and "pruned" in scores_text
        # pin it, then click through to its strongest input: the hash records both
        browser.eval("document.getElementById('pin').click()")
        browser.eval("document.querySelector('#details .edges-list div').click()")
        assert browser.eval("location.hash") == f"#clicked={strongest}&pinned={feature['node_id']}"
        assert browser.eval("document.querySelectorAll('#pinned .pinned-item').length") == 1
        assert browser.eval(f"document.querySelector('circle[data-id=\"{strongest}\"]').classList.contains('clicked')")
        # a click on the node itself in the graph selects it too
        logit = next(n["node_id"] for n in data["nodes"] if n["feature_type"] == "logit")
        browser.eval(f"document.querySelector('circle[data-id=\"{logit}\"]').dispatchEvent(new MouseEvent('click'))")
        assert browser.eval("document.getElementById('clicked-title').textContent").startswith("Output")
        browser.screenshot(tmp_path / "graph.png")
        sent = [e for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        requested = [e["params"]["request"]["url"] for e in sent]
        assert requested and all(u.startswith("file://") for u in requested), requested
    finally:
        browser.close()


@pytest.mark.slow
def test_prompts_file_gives_one_graph_per_line_and_a_summary(run, tmp_path):
    lm, clt = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("x = [1, 2\n\nfor i in range(\n")
    done = sae_attribute(f"clt={clt}", f"prompts={prompts}", f"out={tmp_path / 'g'}", f"lm={lm}", "node_threshold=0.5")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert [s["prompt"] for s in summary] == ["x = [1, 2", "for i in range("]
    for i in range(2):
        assert {p.name for p in (tmp_path / "g" / f"{i:03d}").iterdir()} == {"graph.json", "scores.json", "index.html"}
        assert json.loads((tmp_path / "g" / f"{i:03d}" / "graph.json").read_text())["metadata"]["node_threshold"] == 0.5
    assert (tmp_path / "g" / "summary.md").read_text().count("\n| 00") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["node_threshold=0"], "node_threshold=0.0: expected a fraction in (0, 1]"),
        (["edge_threshold=1.5"], "edge_threshold=1.5: expected a fraction in (0, 1]"),
        (["node_threshold=high"], "node_threshold='high': expected a float"),
        (["prompt= "], "the prompt is empty"),
        (["prompt=" + "a b " * 40], "tokens; the model's context is 32"),
        (["colour=red"], "'colour=red' is not key=value with a key in"),
        (["clt=/nonexistent"], "clt=/nonexistent: no such run directory"),
    ],
)
def test_user_mistakes_end_with_one_line(run, tmp_path, args, message):
    lm, clt = run
    base = {"clt": f"clt={clt}", "prompt": f"prompt={PROMPT}", "out": f"out={tmp_path / 'g'}", "lm": f"lm={lm}"}
    for a in args:
        base[a.split("=")[0] if a.split("=")[0] in base else a] = a
    done = sae_attribute(*base.values())
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "g").exists()


def test_a_dictionary_that_is_not_for_this_model(run, tmp_path):
    lm, clt = run
    other = tiny_gpt2(tmp_path / "three", n_layer=3, n_positions=32)
    done = sae_attribute(f"clt={clt}", f"prompt={PROMPT}", f"out={tmp_path / 'g'}", f"lm={other}")
    assert done.returncode == 2
    assert "transcoders for 2 layers; the model has 3" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    no_store = sae_attribute(f"clt={clt}", f"prompt={PROMPT}", f"out={tmp_path / 'g'}")
    assert no_store.returncode == 2 and "give the model's directory with lm=LM_DIR" in no_store.stderr
