"""The probe app (sae/steer/app.py) on a tiny random GPT-2 and a random ReLU SAE: its JSON API gives the Probe's
own values, every bad request is a 4xx with a one-line JSON error (and the server keeps serving), a busy port
is refused in one line, and the page, in a real headless Chromium over loopback, shows what the API says."""

import http.client
import json
import re
import socket
import tempfile
import threading
import time

import numpy as np
import pytest
from chromium import Chromium, _chromium
from hf_oracle import relu_sae, tiny_gpt2

import sae.steer.app as app_module
from sae.errors import DataError
from sae.models import load
from sae.steer.app import make_server, serve
from sae.steer.directions import Direction
from sae.steer.interventions import Add, Feature, positions
from sae.steer.probe import Probe

SITE = "blocks.0.hook_resid_post"
TEXT = "The quick brown fox jumps over the lazy dog."
EDITED = "The quick red fox jumps over the lazy dog."
PROMPT = "def add(a, b):"
N_NEW = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The model, SAE, probe, a saved direction, a run with a fake feature browser, and the server's port."""
    root = tmp_path_factory.mktemp("probe_app")
    checkpoint = tiny_gpt2(root / "model", bos_token_id=0, eos_token_id=0)
    model, tokenizer = load(checkpoint)
    rng = np.random.default_rng(1)
    sae = relu_sae()
    probe = Probe(model, tokenizer, sae, SITE)
    direction = root / "direction"
    Direction(["blocks.1.hook_resid_post", SITE], rng.normal(size=(2, 32)).astype(np.float32), "mean", "x").save(
        direction
    )
    run = root / "run"
    (run / "inspect" / "data").mkdir(parents=True)
    (run / "inspect" / "index.html").write_text("<!doctype html><title>browser</title>")
    (run / "inspect" / "data" / "chunk_00000.js").write_text("SAE_CHUNK({});")
    (run / "secret.txt").write_text("not to be served")
    server = make_server(probe, 0, run / "inspect", run, checkpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"probe": probe, "sae": sae, "port": server.server_address[1], "direction": direction, "run": run}
    finally:
        server.shutdown()
        server.server_close()


def call(env, method: str, path: str, body=None, raw: bytes | None = None):
    """(status, the JSON reply or the raw bytes) of one request to the app."""
    conn = http.client.HTTPConnection("127.0.0.1", env["port"], timeout=120)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        reply = conn.getresponse()
        payload = reply.read()
        kind = reply.getheader("Content-Type") or ""
    finally:
        conn.close()
    return reply.status, json.loads(payload) if kind.startswith("application/json") else payload


def post(env, path: str, body) -> dict:
    status, got = call(env, "POST", path, body)
    assert status == 200, got
    return got


def nulls(values) -> list:
    return [None if np.isnan(v) else float(v) for v in values]


def expected_changes(d, t: int, top: int = 8) -> list:
    order = np.argsort(-np.abs(d.delta[t]), kind="stable")[:top]
    return [[int(i), float(d.delta[t, i]), float(d.after.codes[t, i])] for i in order if d.delta[t, i] != 0]


def drivers_case(probe) -> tuple[int, int]:
    """(feature, position): the last token's strongest feature there."""
    reading = probe.activations(TEXT)
    position = len(reading.ids) - 1
    return int(reading.top(1)[0][position, 0]), position


# --- the API against the Probe -------------------------------------------------------------------------------


def test_info_page_and_feature_browser(env):
    status, info = call(env, "GET", "/api/info")
    assert status == 200
    assert info == {
        "site": SITE,
        "d_sae": 64,
        "d_in": 32,
        "n_ctx": 32,
        "architecture": "relu",
        "model": str(env["run"].parent / "model"),
        "run": str(env["run"]),
        "has_browser": True,
    }
    status, page = call(env, "GET", "/")
    assert status == 200 and b'id="tokens"' in page and b"<script>" in page
    assert not re.search(rb"""(src|href)=["']?(https?:)?//""", page), "the page loads nothing from the network"
    assert call(env, "GET", "/inspect/index.html") == (200, b"<!doctype html><title>browser</title>")
    assert call(env, "GET", "/inspect/data/chunk_00000.js")[0] == 200
    for path in ("/inspect/../secret.txt", "/inspect/%2e%2e/secret.txt", "/inspect/data/..%2f..%2fsecret.txt"):
        status, got = call(env, "GET", path)
        assert status == 404 and "error" in got, (path, got)
    assert call(env, "GET", "/inspect/nothing.js")[0] == 404


def test_activations_equal_the_probe(env):
    probe = env["probe"]
    got = post(env, "/api/activations", {"text": TEXT, "features": [3, 17], "top": 5})
    reading = probe.activations(TEXT)
    idx, values = reading.top(5)
    assert got["tokens"] == reading.strings and got["ids"] == reading.ids.tolist()
    assert got["top"] == [[[int(i), float(v)] for i, v in zip(a, b)] for a, b in zip(idx, values)]
    assert got["features"] == {"3": reading.codes[:, 3].tolist(), "17": reading.codes[:, 17].tolist()}
    assert got["truncated"] == 0 and "warning" not in got
    assert len(post(env, "/api/activations", {"text": TEXT})["top"][0]) == 8  # the default
    # Monitoring: the projection on a saved direction at its site, per token and pooled.
    watched = post(env, "/api/activations", {"text": TEXT, "direction": str(env["direction"])})["projection"]
    v = Direction.load(env["direction"]).vector(SITE)
    acts = np.asarray(probe.model(np.asarray([probe.tokens(TEXT)[0]]), [SITE])[1][SITE][0])
    np.testing.assert_allclose(watched["values"], acts[len(probe.prefix) :] @ v / np.linalg.norm(v), atol=1e-5)
    assert watched["site"] == SITE and watched["mean"] == pytest.approx(np.mean(watched["values"]), abs=1e-6)
    long = post(env, "/api/activations", {"text": TEXT * 6})
    assert long["truncated"] == probe.activations(TEXT * 6).truncated > 0
    assert len(long["tokens"]) == 31 and "cut off" in long["warning"]


def test_diff_equals_the_probe_and_is_zero_before_the_edit(env):
    probe = env["probe"]
    got = post(env, "/api/diff", {"before": TEXT, "after": EDITED})
    d = probe.diff(TEXT, EDITED)
    assert got["tokens"] == d.after.strings and got["before_tokens"] == d.before.strings
    assert got["match"] == d.match.tolist()
    edit = int(np.flatnonzero(d.match < 0)[0])
    assert edit > 0 and np.all(d.delta[:edit] == 0)  # a causal model: nothing moves before the edit
    assert got["changes"][:edit] == [[]] * edit and got["changed"][:edit] == [False] * edit
    assert got["changes"] == [expected_changes(d, t) for t in range(len(d.match))]
    assert got["changed"] == [bool(m < 0 or np.any(d.delta[t] != 0)) for t, m in enumerate(d.match)]
    assert any(got["changed"][edit:])
    assert got["removed"] == sorted(set(range(len(d.before.ids))) - set(d.match[d.match >= 0].tolist()))
    assert got["removed"]
    assert post(env, "/api/diff", {"before": TEXT, "after": TEXT})["changed"] == [False] * len(d.before.ids)


def test_drivers_equal_the_probe(env):
    probe = env["probe"]
    feature, position = drivers_case(probe)
    got = post(env, "/api/drivers", {"text": TEXT, "feature": feature, "position": position})
    want = probe.drivers(TEXT, feature, position)
    assert got["tokens"] == probe.activations(TEXT).strings[: position + 1]
    assert got["value"] == want.value > 0
    assert got["leave_one_out"] == nulls(want.leave_one_out) and got["leave_one_out"][-1] is None
    assert got["grad_x_input"] == nulls(want.grad_x_input) and len(got["grad_x_input"]) == position + 1


def test_generate_equals_the_probe_and_zero_strengths_change_nothing(env):
    probe, sae = env["probe"], env["sae"]
    decode = probe.tokenizer.decode
    vocab = {t: probe.vocab[t] if t < len(probe.vocab) else f"<{t}>" for t in range(320)}  # 320 ids, 300 strings
    body = {"text": PROMPT, "max_new_tokens": N_NEW, "interventions": [{"feature": 3, "op": "clamp", "value": 5.0}]}
    got = post(env, "/api/generate", body)
    want = probe.generate(PROMPT, [Feature(SITE, sae, 3, "clamp")], [5.0], N_NEW)
    assert got["default"] == decode(want.default) and got["steered"] == decode(want.steered)
    assert got["default_tokens"] == [vocab[t] for t in want.default] and len(got["default_tokens"]) == N_NEW
    assert got["steered_tokens"] == [vocab[t] for t in want.steered] and got["steered"] != got["default"]
    assert got["next_before"] == [[vocab[t], float(p)] for t, p in zip(*want.next_before)]
    assert got["next_after"] == [[vocab[t], float(p)] for t, p in zip(*want.next_after)]
    # A feature's decoder row added, and a direction (at the SAE's site, on the prompt): strength 0 is the model.
    items = [
        {"feature": 5, "op": "add", "value": 0},
        {"direction": str(env["direction"]), "strength": 0.0, "positions": "prompt"},
    ]
    zero = post(env, "/api/generate", {"text": PROMPT, "max_new_tokens": N_NEW, "interventions": items})
    assert zero["steered"] == zero["default"] == got["default"] and zero["next_after"] == zero["next_before"]
    items[0]["value"], items[1]["strength"] = 0.5, 3.0
    steered = post(env, "/api/generate", {"text": PROMPT, "max_new_tokens": N_NEW, "interventions": items})
    n_prompt = len(probe.tokens(PROMPT)[0])
    vector = Direction.load(env["direction"]).vector(SITE)
    same = [
        Add(SITE, np.asarray(sae.params["W_dec"][5], np.float32)),
        Add(SITE, vector, positions("prompt", n_prompt, probe.model.config.n_ctx)),
    ]
    want = probe.generate(PROMPT, same, [0.5, 3.0], N_NEW)
    assert steered["steered"] == decode(want.steered)
    assert steered["next_after"] == [[vocab[t], float(p)] for t, p in zip(*want.next_after)]


# --- refusals -------------------------------------------------------------------------------------------------

GEN = "/api/generate"


def bad_requests(env) -> list:
    d = str(env["direction"])
    gen = lambda *items, **kw: {"text": PROMPT, "interventions": list(items), **kw}
    return [
        ("POST", "/api/activations", b"{not json", 400, "not JSON"),
        ("POST", "/api/activations", b"[1, 2]", 400, "expected an object"),
        ("POST", "/api/activations", b"", 400, "not JSON"),
        ("POST", "/api/activations", {}, 400, "text: missing"),
        ("POST", "/api/activations", {"text": 5}, 400, "text: expected a string"),
        ("POST", "/api/activations", {"text": "  \n"}, 400, "text: the text is empty"),
        ("POST", "/api/activations", {"text": TEXT, "features": [64]}, 400, "features[0]=64 is out of range"),
        ("POST", "/api/activations", {"text": TEXT, "features": [-1]}, 400, "features[0]=-1 is out of range"),
        ("POST", "/api/activations", {"text": TEXT, "direction": "/nowhere"}, 400, "direction='/nowhere'"),
        (
            "POST",
            "/api/activations",
            {"text": TEXT, "direction": str(env["direction"]), "direction_site": "x"},
            400,
            'site="x": the direction has the sites',
        ),
        ("POST", "/api/activations", {"text": TEXT, "features": "3"}, 400, 'features="3": expected a list'),
        ("POST", "/api/activations", {"text": TEXT, "top": 0}, 400, "top=0 is out of range"),
        ("POST", "/api/activations", {"text": TEXT, "top": "8"}, 400, 'top="8": expected an integer'),
        ("POST", "/api/diff", {"before": TEXT}, 400, "after: missing"),
        ("POST", "/api/diff", {"before": "", "after": TEXT}, 400, "before: the text is empty"),
        ("POST", "/api/drivers", {"text": TEXT, "position": 0}, 400, "feature: missing"),
        ("POST", "/api/drivers", {"text": TEXT, "feature": 64, "position": 0}, 400, "feature=64 is out of range"),
        ("POST", "/api/drivers", {"text": TEXT, "feature": 1.5, "position": 0}, 400, "feature=1.5: expected"),
        ("POST", "/api/drivers", {"text": TEXT, "feature": 1, "position": 99}, 400, "position 99 is out of range"),
        ("POST", "/api/drivers", {"text": TEXT, "feature": 1, "position": -1}, 400, "position -1 is out of range"),
        ("POST", "/api/drivers", {"text": TEXT, "feature": 1, "position": "0"}, 400, 'position="0": expected'),
        ("POST", GEN, gen({"feature": 1, "op": "zero", "value": 1}), 400, 'interventions[0].op="zero" is not one'),
        ("POST", GEN, gen({"feature": 64, "op": "clamp", "value": 1}), 400, "interventions[0].feature=64 is out of"),
        ("POST", GEN, gen({"feature": 1, "op": "clamp"}), 400, "interventions[0].value: missing"),
        ("POST", GEN, gen({"feature": 1, "op": "scale", "value": "big"}), 400, 'interventions[0].value="big"'),
        ("POST", GEN, gen({"feature": 1, "value": 1, "site": "blocks.1.hook_resid_post"}), 400, "trained on"),
        ("POST", GEN, gen({"direction": d + "-missing", "strength": 1}), 400, "has no direction.safetensors"),
        ("POST", GEN, gen({"direction": str(env["run"]), "strength": 1}), 400, "has no direction.safetensors"),
        ("POST", GEN, gen({"direction": d, "strength": 1}, {"direction": d}), 400, "interventions[1].strength: miss"),
        ("POST", GEN, gen({"direction": d, "strength": 1, "site": "blocks.7.x"}), 400, "the direction has the sites"),
        ("POST", GEN, gen({"feature": 1, "value": 1, "positions": "middle"}), 400, 'positions="middle"'),
        ("POST", GEN, gen({"feature": 1, "value": 1, "positions": [99]}), 400, "].positions: positions [99] fall"),
        ("POST", GEN, gen({"value": 1}), 400, "interventions[0]: expected a 'feature' or a 'direction'"),
        ("POST", GEN, gen(7), 400, "interventions[0]: expected an object"),
        ("POST", GEN, {"text": PROMPT, "interventions": {"feature": 1}}, 400, "interventions={"),
        ("POST", GEN, gen(max_new_tokens=1000), 400, "max_new_tokens=1000 is out of range"),
        ("POST", GEN, gen(temperature=-1), 400, "temperature=-1.0"),
        ("POST", GEN, {"interventions": []}, 400, "text: missing"),
        ("GET", "/nothing", None, 404, "/nothing"),
        ("POST", "/api/nothing", {}, 404, "/api/nothing"),
        ("GET", "/api/activations", None, 405, "use POST"),
        ("POST", "/api/info", {}, 405, "use GET"),
        ("DELETE", "/api/diff", None, 405, "use POST"),
        ("PUT", "/", b"x", 405, "use GET"),
    ]


def test_bad_requests_are_one_line_json_errors_and_the_server_keeps_serving(env, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "direction.safetensors").write_bytes(b"\0" * 16)
    (damaged / "direction.json").write_text("{")
    cases = bad_requests(env)
    cases.append(("POST", GEN, {"text": PROMPT, "interventions": [{"direction": str(damaged), "strength": 1}]}))
    cases[-1] += (400, "cannot be loaded")
    for method, path, body, status, message in cases:
        raw = body if isinstance(body, bytes) else None
        got_status, got = call(env, method, path, None if raw is not None else body, raw)
        assert got_status == status, (method, path, body, got)
        assert isinstance(got, dict) and list(got) == ["error"], got
        error = got["error"]
        assert message in error and "\n" not in error and "Traceback" not in error, (body, error)
    assert post(env, "/api/activations", {"text": TEXT})["tokens"] == env["probe"].activations(TEXT).strings


def test_requests_reach_the_probe_one_at_a_time(env, monkeypatch):
    probe, inside, most = env["probe"], [0], [0]
    activations = probe.activations

    def counted(text):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.05)
            return activations(text)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(probe, "activations", counted)
    got = [None] * 6
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, call(env, "POST", "/api/activations", {"text": TEXT})))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and all(status == 200 and reply == got[0][1] for status, reply in got)


def test_a_port_in_use_is_refused_in_one_line(env, monkeypatch, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    message = f"port={port} is in use on 127.0.0.1; give another with port=N"
    try:
        with pytest.raises(DataError, match=re.escape(message)):
            make_server(env["probe"], port)
        monkeypatch.setattr(app_module, "open_probe", lambda run, lm: pytest.fail("the model loaded before the port"))
        with pytest.raises(DataError, match=re.escape(message)):
            serve(env["run"], env["run"].parent / "model", port)
    finally:
        busy.close()
    monkeypatch.setattr(app_module, "open_probe", lambda run, lm: env["probe"])

    # serve() prints one line, and Ctrl-C (here raised by serve_forever) ends it cleanly.
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(app_module.Server, "serve_forever", interrupted)
    serve(env["run"], env["run"].parent / "model", 0)
    out = capsys.readouterr().out
    assert re.fullmatch(rf"sae-probe: http://127\.0\.0\.1:\d+/ \(site {SITE}, d_sae 64\); Ctrl-C stops\n", out), out


# --- the page in headless Chromium ----------------------------------------------------------------------------


def test_page_in_chromium_shows_what_the_api_says(env, tmp_path):
    """Type, edit, ask for drivers and steer in the page; what it shows equals the API's answers, and every
    request it makes goes to the app's own origin."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (.ci/run installs Debian's chromium)")
    probe, origin = env["probe"], f"http://127.0.0.1:{env['port']}"
    browser = Chromium(binary, tempfile.mkdtemp(dir=tmp_path), loopback=True)

    def js(expression):
        return browser.eval(expression)

    def type_text(text: str, done: str, count: int):
        js(f"var t = document.getElementById('text'); t.value = {json.dumps(text)}; ")
        js("document.getElementById('text').dispatchEvent(new Event('input', {bubbles: true}))")
        browser.wait_for(f"window.PROBE_DONE.{done} >= {count}", timeout=30)

    shown_tokens = "Array.from(document.querySelectorAll('#tokens .tok')).map(s => s.textContent)"
    try:
        browser.call("Page.navigate", browser.session, url=origin + "/")
        browser.wait_for("(document.getElementById('info') || {}).textContent?.includes('d_sae 64')")
        # Type: the tokens and a token's top features, as /api/activations gives them.
        type_text(TEXT, "activations", 1)
        api = post(env, "/api/activations", {"text": TEXT, "top": 8})
        assert js(shown_tokens) == api["tokens"]
        k = max(range(len(api["tokens"])), key=lambda i: api["top"][i][0][1])
        js(f"document.querySelector('#tokens .tok[data-i=\"{k}\"]').click()")
        rows = js(
            "Array.from(document.querySelectorAll('#top-features tbody tr'))"
            ".map(r => [+r.dataset.feature, +r.dataset.value, r.querySelector('a').getAttribute('href')])"
        )
        active = [fv for fv in api["top"][k] if fv[1] != 0]
        assert [r[:2] for r in rows] == active and rows[0][2] == f"/inspect/index.html#f={active[0][0]}"
        assert js("document.getElementById('error').hidden")
        # The chosen features' rows along the text.
        js("var f = document.getElementById('features'); f.value = '3, 17'; f.dispatchEvent(new Event('input'))")
        browser.wait_for("window.PROBE_DONE.activations >= 2", timeout=30)
        shown = js("Array.from(document.querySelectorAll('#feature-row-17 .ftok')).map(s => +s.dataset.value)")
        assert shown == post(env, "/api/activations", {"text": TEXT, "features": [17]})["features"]["17"]
        # Monitoring along the text: a saved direction's projection per token.
        js(
            f"var m = document.getElementById('monitor'); m.value = {json.dumps(str(env['direction']))};"
            "m.dispatchEvent(new Event('input'))"
        )
        browser.wait_for("!!document.querySelector('#projection-row')", timeout=30)
        shown = js("Array.from(document.querySelectorAll('#projection-row .ftok')).map(s => +s.dataset.value)")
        assert (
            shown
            == post(env, "/api/activations", {"text": TEXT, "direction": str(env["direction"])})["projection"]["values"]
        )
        js("var m = document.getElementById('monitor'); m.value = ''; m.dispatchEvent(new Event('input'))")
        browser.wait_for("!document.querySelector('#projection-row')", timeout=30)
        # Edit: the `changed` marks and the selected token's changes are the diff's.
        type_text(EDITED, "diff", 1)
        diff = post(env, "/api/diff", {"before": TEXT, "after": EDITED})
        assert js(shown_tokens) == diff["tokens"]
        assert (
            js("Array.from(document.querySelectorAll('#tokens .tok')).map(s => s.classList.contains('changed'))")
            == (diff["changed"])
        )
        j = next(i for i, c in enumerate(diff["changes"]) if c and diff["match"][i] >= 0)
        js(f"document.querySelector('#tokens .tok[data-i=\"{j}\"]').click()")
        shown = js(
            "Array.from(document.querySelectorAll('#changes tbody tr'))"
            ".map(r => [+r.dataset.feature, +r.dataset.delta])"
        )
        assert shown == [c[:2] for c in diff["changes"][j]]
        # Drivers, from the inputs and the button, on the text as first typed.
        type_text(TEXT, "diff", 2)
        feature, position = drivers_case(probe)
        js(f"document.getElementById('drivers-feature').value = '{feature}'")
        js(f"document.getElementById('drivers-position').value = '{position}'")
        js("document.getElementById('drivers-run').click()")
        browser.wait_for("window.PROBE_DONE.drivers >= 1", timeout=60)
        drivers = post(env, "/api/drivers", {"text": TEXT, "feature": feature, "position": position})
        read = lambda cls: js(
            f"Array.from(document.querySelectorAll('#drivers-table tbody td.{cls}'))"
            ".map(c => [c.dataset.value === '' ? null : +c.dataset.value, c.textContent])"
        )
        for cls, key in (("loo", "leave_one_out"), ("gxi", "grad_x_input")):
            cells = read(cls)
            assert [c[0] for c in cells] == drivers[key]
            for (_, text), want in zip(cells, drivers[key]):
                assert (text == "–") if want is None else float(text) == pytest.approx(want, rel=6e-3, abs=1e-12)
        assert float(js("document.getElementById('drivers-summary').dataset.value")) == drivers["value"]
        # Steer: one feature clamped; the continuations shown are the API's.
        js("document.getElementById('steer-add-feature').click()")
        js(
            "var r = document.querySelector('#steer-rows .steer-row'); r.querySelector('.steer-feature').value = '3';"
            "r.querySelector('.steer-op').value = 'clamp'; r.querySelector('.steer-value').value = '5';"
            f"document.getElementById('max-new-tokens').value = '{N_NEW}';"
            f"document.getElementById('text').value = {json.dumps(PROMPT)}"
        )
        js("document.getElementById('generate').click()")
        browser.wait_for("window.PROBE_DONE.generate >= 1", timeout=60)
        body = {"text": PROMPT, "max_new_tokens": N_NEW, "interventions": [{"feature": 3, "op": "clamp", "value": 5}]}
        gen = post(env, GEN, body)
        assert gen["steered"] != gen["default"]
        assert js("document.getElementById('default-text').textContent") == gen["default"]
        assert js("document.getElementById('steered-text').textContent") == gen["steered"]
        assert js("document.querySelectorAll('#next-after tbody tr').length") == len(gen["next_after"]) == 10
        # A refused request shows its error.
        errors = js("window.PROBE_DONE.errors")
        js(
            "document.querySelector('#steer-rows .steer-feature').value = '64';"
            "document.getElementById('generate').click()"
        )
        browser.wait_for(f"window.PROBE_DONE.errors > {errors}", timeout=30)
        assert not js("document.getElementById('error').hidden")
        assert "interventions[0].feature=64 is out of range" in js("document.getElementById('error').textContent")
        browser.screenshot(tmp_path / "probe.png")
        requests = [
            e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
        ]
        assert requests and all(u.startswith(origin + "/") for u in requests), requests
        assert any(u.endswith("/api/generate") for u in requests)
    finally:
        browser.close()
