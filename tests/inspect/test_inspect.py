"""Feature inspection (sae/inspect/): streaming statistics against in-memory NumPy, ground-truth matches,
token context, the `sae-inspect` CLI, and the static browser in a real headless Chromium."""

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from chromium import Chromium, _chromium
from conftest import ROOT, small_config

import sae.inspect.run as inspect_module
from sae.cli import run_job
from sae.data.store import StoreWriter
from sae.data.synthetic import SyntheticBatches
from sae.export import LoadedSAE, load_sae
from sae.inspect import inspect_run, load
from sae.inspect.examples import context_rows, latent_values
from sae.inspect.stats import accumulate, column_top_k, float_bins, group_size, hash_priority
from sae.training import train

SCRIPT = str(Path(ROOT) / "scripts" / "inspect_features.py")
N_ROWS, SEQ, VOCAB = 6000, 32, 40  # the token store: N_ROWS rows of SEQ-token sequences
KW = {"batch_size": 1024, "top_k": 8, "n_random": 8, "random_stride": 4, "context_before": 3, "context_after": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A TopK SAE trained on synthetic data with known ground truth (48 features in 24 dims, 96 latents)."""
    out = tmp_path_factory.mktemp("inspect") / "run"
    cfg = small_config("topk", k=3)
    metrics = train(cfg, out)
    return out, cfg, metrics


@pytest.fixture(scope="module")
def token_store(run, tmp_path_factory):
    """A float32 store of N_ROWS synthetic rows with token ids, positions and a vocab.json."""
    _, cfg, _ = run
    path = tmp_path_factory.mktemp("store") / "store"
    x = np.asarray(SyntheticBatches(cfg.data, 0, 7).sample(N_ROWS, 0))
    rng = np.random.default_rng(0)
    with StoreWriter(path, x.shape[1], "float32", shard_rows=2048, with_tokens=True) as writer:  # 3 shards
        writer.append(x, tokens=rng.integers(0, VOCAB, N_ROWS), positions=np.arange(N_ROWS) % SEQ)
    (path / "vocab.json").write_text(json.dumps([f"tok{i}" for i in range(VOCAB)]))
    return path, x


@pytest.fixture(scope="module")
def store_inspection(run, token_store, tmp_path_factory):
    run_dir, _, _ = run
    (run_dir / "labels.json").write_text(json.dumps({"5": "planted label"}))
    out = tmp_path_factory.mktemp("site") / "inspect"
    insp = inspect_run(run_dir, data={"name": "cached", "path": str(token_store[0])}, out=str(out), **KW)
    return insp, out


def test_ground_truth_matches_recover_planted_features(run, tmp_path):
    """Best matches agree with NumPy and with training's MMCS; matched latents fire as often as their feature."""
    run_dir, cfg, metrics = run
    insp = inspect_run(run_dir, rows=32768, out=str(tmp_path / "inspect"), **KW)
    truth = np.load(run_dir / "ground_truth.npy")
    w_dec = np.asarray(load_sae(run_dir / "sae").params["W_dec"])
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)
    sims = unit(w_dec) @ unit(truth).T
    np.testing.assert_array_equal(insp.arrays["gt_match"], sims.argmax(1))
    np.testing.assert_allclose(insp.arrays["gt_cosine"], sims.max(1), atol=1e-5)
    assert insp.mmcs()["mmcs"] == pytest.approx(metrics["mmcs"], abs=1e-5)
    recovered = set(insp.arrays["gt_match"][insp.arrays["gt_cosine"] > 0.9])
    assert len(recovered) >= 0.9 * len(truth)
    # A latent matched at cos > 0.97 fires on about the rows where its planted feature fires.
    p = np.asarray(SyntheticBatches(cfg.data, 0, cfg.seed).features.probabilities)
    good = np.flatnonzero(insp.arrays["gt_cosine"] > 0.97)
    good = good[p[insp.arrays["gt_match"][good]] > 0.02]  # enough firings to estimate the density
    assert len(good) >= 10
    ratio = insp.density[good] / p[insp.arrays["gt_match"][good]]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.15), ratio
    assert set(insp.plots) == {"density", "l0", "recovery"}
    np.testing.assert_array_equal(insp.l0[1][3], 32768)  # TopK k=3: every row has L0 = 3
    # Neighbours against a NumPy reference (self excluded, most similar first).
    cos = unit(w_dec) @ unit(w_dec).T
    np.fill_diagonal(cos, -np.inf)
    np.testing.assert_allclose(insp.arrays["neighbour_cosines"], -np.sort(-cos, axis=1)[:, :8], atol=1e-5)


def test_streaming_statistics_equal_in_memory(store_inspection, token_store, run):
    """On a small store (6000 rows, batches of 1024: the last one padded), every statistic equals NumPy's
    over all rows at once: density, mean, max, histogram, L0, top-k, the hash-priority random sample."""
    insp, _ = store_inspection
    _, x = token_store
    f = np.asarray(load_sae(run[0] / "sae").encode(jnp.asarray(x)))  # [N_ROWS, d_sae]
    active = f > 0
    np.testing.assert_array_equal(insp.arrays["fires"], active.sum(0))
    np.testing.assert_allclose(insp.arrays["total"], f.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(insp.arrays["max"], f.max(0))
    np.testing.assert_array_equal(insp.l0[1], np.bincount(active.sum(1), minlength=f.shape[1] + 1))
    edges = insp.arrays["hist_edges"]
    for j in range(f.shape[1]):
        v = np.clip(f[active[:, j], j], edges[0], edges[-1] * 0.999)
        np.testing.assert_array_equal(insp.arrays["hist"][j], np.histogram(v, edges)[0], err_msg=f"feature {j}")
    # Top-k: values and rows of a full sort.
    order = np.argsort(-f, axis=0, kind="stable")[:8].T  # [d_sae, 8]
    expected = np.take_along_axis(f.T, order, axis=1)
    np.testing.assert_array_equal(insp.arrays["top_values"], expected)
    np.testing.assert_array_equal(insp.arrays["top_rows"], np.where(expected > 0, order, -1))
    # Random sample: the 8 highest hash priorities among firing rows of every 4th row, in memory.
    rows = np.arange(0, N_ROWS, 4)
    prio = np.asarray(hash_priority(jnp.asarray(rows)[:, None], jnp.arange(f.shape[1])[None, :], 0))
    prio = np.where(active[rows], prio, -1.0)
    for j in range(f.shape[1]):
        chosen = rows[np.argsort(-prio[:, j], kind="stable")[:8]]
        chosen = chosen[active[chosen, j]]
        got = insp.arrays["random_rows"][j]
        assert set(got[got >= 0]) == set(chosen), j
        np.testing.assert_array_equal(insp.arrays["random_values"][j][got >= 0], f[got[got >= 0], j])


def test_token_context_and_search(store_inspection, token_store, run):
    """Context windows stay in their sequence; each token's activation is the feature's own value there."""
    insp, _ = store_inspection
    _, x = token_store
    f = np.asarray(load_sae(run[0] / "sae").encode(jnp.asarray(x)))
    tokens = np.random.default_rng(0).integers(0, VOCAB, N_ROWS)
    j = int(np.argmax(insp.arrays["fires"]))
    feat = insp.feature(j)
    assert feat.label is None and insp.feature(5).label == "planted label"
    assert len(feat.top) == 8 and len(feat.random) == 8
    for ex in feat.top + feat.random:
        r = ex.row
        window = [q for q in range(r - 3, r + 3) if 0 <= q < N_ROWS and q // SEQ == r // SEQ]
        assert ex.tokens == [f"tok{tokens[q]}" for q in window]
        np.testing.assert_allclose(ex.values, f[window, j], rtol=1e-5, atol=1e-6)
        assert window[ex.centre] == r and ex.values[ex.centre] == pytest.approx(ex.value)
    # Quantiles: top examples sit high in the distribution, random ones spread below.
    assert feat.top[0].quantile > 0.9 and min(e.quantile for e in feat.random) < 0.5
    hits = dict(insp.features_by_token(feat.top[0].tokens[feat.top[0].centre], k=len(f.T)))
    assert j in hits
    idx, cos = insp.features_by_direction(np.asarray(load_sae(run[0] / "sae").params["W_dec"])[j] * 3.0, k=3)
    assert idx[0] == j and cos[0] == pytest.approx(1.0, abs=1e-5)
    # The saved inspection loads back equal.
    again = load(store_inspection[1])
    assert again.feature(j).top[0].tokens == feat.top[0].tokens and again.vocab == insp.vocab


def test_column_top_k_and_float_bins():
    """Grouped top-k equals a full top-k (also with k above the number of groups); bins are exact float32 edges."""
    rng = np.random.default_rng(0)
    for n, d, k in ((1024, 7, 8), (64, 5, 10)):
        values = rng.exponential(size=(n, d)).astype(np.float32) * (rng.random((n, d)) < 0.3)
        top, rows = column_top_k(jnp.asarray(values), k, group_size(n, k))
        np.testing.assert_array_equal(np.asarray(top), -np.sort(-values.T, axis=1)[:, :k])
        np.testing.assert_array_equal(np.take_along_axis(values.T, np.asarray(rows), axis=1), np.asarray(top))
    assert group_size(4096, 16) == 16 and group_size(96, 1) == 8
    _, _, n_bins, edges = float_bins(4, 1.0, 2.0)
    assert n_bins == 5 and edges.tolist() == [1.0, 1.25, 1.5, 1.75, 2.0, 2.5]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_latent_values_match_full_encode(arch):
    """One latent at a time (the context pass) equals SAELens's rule on whole rows, for every architecture."""
    rng = np.random.default_rng(1)
    d_in, d_sae, n = 6, 10, 64
    names = {
        "standard": ["b_enc"],
        "topk": ["b_enc"],
        "jumprelu": ["b_enc", "threshold"],
        "gated": ["b_gate", "r_mag", "b_mag"],
    }[arch]
    params = {
        "W_enc": rng.normal(size=(d_in, d_sae)),
        "W_dec": rng.normal(size=(d_sae, d_in)),
        "b_dec": rng.normal(size=d_in) * 0.1,
        **{k: rng.normal(size=d_sae) * 0.3 for k in names},
    }
    if arch == "jumprelu":
        params["threshold"] = np.abs(params["threshold"])
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": arch != "jumprelu", "k": 3}
    sae = LoadedSAE(arch, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, cfg)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    f = np.asarray(sae.encode(jnp.asarray(x)))
    active = f > 0
    floor = np.where(active.sum(1) >= 3, np.where(active, f, np.inf).min(1), 0.0).astype(np.float32)
    rows, feats = np.repeat(np.arange(n), d_sae), np.tile(np.arange(d_sae), n)
    got = np.asarray(latent_values(sae)(sae.params, x[rows], feats, floor[rows]))
    np.testing.assert_allclose(got.reshape(n, d_sae), f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_sparse_folds_equal_the_dense_fold(arch):
    """The statistics step folds a code compacted to 64 or 256 slots per row, or f itself when its widest row
    has more (batches here take all three), and every statistic equals the fold of f alone (capacities=())."""
    rng = np.random.default_rng(2)
    d_in, d_sae, batch = 8, 300, 128
    names = {"standard": ["b_enc"], "jumprelu": ["b_enc", "threshold"], "gated": ["b_gate", "r_mag", "b_mag"]}[arch]
    params = {"W_enc": rng.normal(size=(d_in, d_sae)), "W_dec": rng.normal(size=(d_sae, d_in)), "b_dec": np.zeros(d_in)}
    params |= {k: rng.normal(size=d_sae) * 0.1 for k in names}
    params["W_enc"][0] = np.abs(params["W_enc"][0]) + 0.5  # x_0 ≫ 0 opens every latent
    params["b_gate" if arch == "gated" else "b_enc"] -= 4.0
    if arch == "jumprelu":
        params["threshold"] = np.abs(params["threshold"])
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False}
    sae = LoadedSAE(arch, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, cfg)
    # widest rows under 64, under 256, over 256 of 300 slots; a partial batch
    x = [rng.normal(size=(n, d_in)).astype(np.float32) * s for n, s in ((batch, 0.5), (batch, 1), (batch, 1), (50, 1))]
    x[2][:, 0] += 10.0
    widest = [int((np.asarray(sae.encode(jnp.asarray(b))) > 0).sum(1).max()) for b in x]
    assert widest[0] < 64 <= widest[1] < 256 <= widest[2], widest
    batches = lambda: ((i * batch, b) for i, b in enumerate(x))
    kw = {"top_k": 8, "n_random": 8, "random_stride": 4}
    got, want = accumulate(sae, batches(), batch, **kw), accumulate(sae, batches(), batch, capacities=(), **kw)
    for key in want:
        if key == "total":
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert want["fires"].sum() > 0 and (want["top_rows"] >= 0).any() and (want["random_rows"] >= 0).any()


def test_context_rows_respect_sequences():
    positions = np.array([0, 1, 2, 0, 1, 2, 3])
    got = context_rows(np.array([[0, 2, 4, -1]]), positions, before=2, after=1)
    np.testing.assert_array_equal(got[0], [[-1, -1, 0, 1], [0, 1, 2, -1], [-1, 3, 4, 5], [-1, -1, -1, -1]])


@pytest.mark.slow
def test_cli_without_token_ids(run, tmp_path):
    """`sae-inspect` on a synthetic run: statistics, plots and the browser, examples without text panels."""
    run_dir, _, _ = run
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            f"run={run_dir}",
            f"out={out}",
            "rows=9000",
            "batch_size=1024",
            "top_k=8",
            "n_random=8",
            "chunk_features=32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mmcs" in proc.stdout
    for name in ("index.html", "features.js", "density.png", "l0.png", "recovery.png", "stats.npz", "meta.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_rows"] == 9000 and summary["l0_mean"] == 3.0 and summary["mmcs"] > 0.9
    assert summary["plots"]["density"] == str(out / "density.png")
    assert sorted(p.name for p in (out / "data").iterdir()) == ["chunk_00000.js", "chunk_00001.js", "chunk_00002.js"]
    chunk = json.loads((out / "data" / "chunk_00001.js").read_text()[len("SAE_CHUNK(") : -3])
    assert chunk["tokens"] == [] and all(len(ex) == 3 for feat in chunk["features"] for ex in feat["top"])
    assert chunk["features"][0]["id"] == 32
    assert not load(out).has_tokens and load(out).n_rows == 9000


MISTAKES = {  # overrides -> the text the one-line error must contain
    "no_run": (["run={tmp}/nope"], "not a sae-train output directory"),
    "unknown_data_key": (["run={run}", "data.nope=1"], "data.nope is not a field of data=synthetic"),
    "negative_rows": (["run={run}", "rows=-5"], "rows=-5 must be null or > 0"),
}


@pytest.mark.slow
def test_cli_user_mistakes(run, tmp_path):
    """Each mistake (run as concurrent processes) exits non-zero with one line naming it, no traceback."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, SCRIPT, *(a.format(tmp=tmp_path, run=run[0]) for a in args), f"out={tmp_path / name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for name, (args, _) in MISTAKES.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and MISTAKES[name][1] in err, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert not (tmp_path / name / "index.html").exists(), name
    assert not (tmp_path / "nope").exists()  # nothing is created for a run that is not there


# --- progress, Ctrl-C, read-only and full disks ------------------------------------------------------


def test_ctrl_c_during_the_pass_writes_nothing(run, tmp_path, monkeypatch):
    """SIGINT at the first progress report: Interrupted naming the rows done and that nothing was written."""

    class Signalled(inspect_module.Progress):
        def update(self, count):
            if count == 1024:
                os.kill(os.getpid(), signal.SIGINT)
            super().update(count)

    monkeypatch.setattr(inspect_module, "Progress", Signalled)
    out = tmp_path / "out"
    with pytest.raises(inspect_module.Interrupted) as stopped:
        inspect_run(run[0], out=str(out), rows=20_000, **KW)
    assert stopped.value.signum == signal.SIGINT
    assert str(stopped.value) == (
        f"stopped by SIGINT (Ctrl-C) after 1,024 of 20,000 rows: nothing written to {out}; "
        "run the same command again to start over"
    )
    assert not out.exists()


def test_progress_lines_have_a_rate_and_an_eta(run, tmp_path, capsys):
    inspect_run(run[0], out=str(tmp_path / "out"), rows=20_480, **KW)
    lines = [line for line in capsys.readouterr().out.splitlines() if " rows (" in line]
    assert len(lines) == 20 and lines[-1].startswith("inspect: 20,480/20,480 rows (100%), "), lines
    assert all(" rows/s, ETA " in line for line in lines), lines


def test_read_only_out_is_refused_before_any_work(run, tmp_path, monkeypatch, capsys, read_only_outputs):
    def no_work(*args, **kwargs):
        raise AssertionError("the rows were read")

    monkeypatch.setattr(inspect_module, "accumulate", no_work)
    out = tmp_path / "out"
    assert run_job(lambda: inspect_run(run[0], out=str(out), **KW)) == 2
    assert capsys.readouterr().err == f"error: out {out} is not writable: the file system is read-only\n"
    assert not out.exists()


def test_full_disk_while_writing_removes_the_partial_outputs(run, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of the browser's files: one line naming out; what this run wrote is removed and
    a file that was there before is kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def full(insp, where, *args):
        (where / "data").mkdir()
        (where / "data" / "chunk_00000.js").write_text("SAE_CHUNK(")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(inspect_module, "write_site", full)
    assert run_job(lambda: inspect_run(run[0], out=str(out), rows=4096, **KW)) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: cannot write {out}: no space left on the device; removed what this run had written to {out}\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_cli_ctrl_c_is_one_line(run, tmp_path):
    """`sae-inspect` sent SIGINT at its first progress line: exit 130, one line, no traceback, no out."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, f"run={run[0]}", f"out={out}", "rows=10000000", "batch_size=1024"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    line = proc.stdout.readline()
    while " rows (" not in line:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert " rows/s, ETA " in line, line
    lines = [e for e in err.splitlines() if e.strip()]
    assert len(lines) == 2 and "Traceback" not in err, err[-2000:]
    assert lines[1].startswith("stopped by SIGINT (Ctrl-C) after ") and lines[1].endswith(
        f"rows: nothing written to {out}; run the same command again to start over"
    ), err
    assert not out.exists()


# --- the browser -------------------------------------------------------------------------------------


def _first_by(values: np.ndarray) -> int:
    """The feature the page lists first when sorting by `values` descending (4 significant digits, ties by id)."""
    shown = np.array([float(f"{v:.4g}") for v in values])
    return int(np.flatnonzero(shown == shown.max())[0])


def test_browser_list_search_and_feature_page(store_inspection, tmp_path):
    """index.html from file:// in headless Chromium: the list renders and sorts, typing in the search box and
    a #q= link filter it, a feature page shows its examples with highlighted tokens, nothing leaves file://."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (.ci/run installs Debian's chromium)")
    insp, site = store_inspection
    browser = Chromium(binary, tempfile.mkdtemp(dir=tmp_path))
    try:
        url = (site / "index.html").as_uri()
        browser.call("Page.navigate", browser.session, url=url)
        n = browser.wait_for("document.querySelectorAll('tr.feature-row').length")
        assert n == min(100, insp.d_sae)
        assert browser.eval("document.getElementById('count').textContent") == f"{insp.d_sae} of {insp.d_sae} features"
        # Default sort: density (as shown, 4 significant digits), highest first, ties by id.
        first = browser.eval("document.querySelector('tr.feature-row').dataset.id")
        assert int(first) == _first_by(insp.density)
        browser.screenshot(tmp_path / "list.png")
        # Typing into the search box filters the list (label search) and is mirrored in the URL.
        browser.eval(
            "var s = document.getElementById('search'); s.value = 'planted'; "
            "s.dispatchEvent(new Event('input', {bubbles: true}))"
        )
        ids = browser.eval("Array.from(document.querySelectorAll('tr.feature-row')).map(r => +r.dataset.id)")
        assert ids == [5]
        assert "q=planted" in browser.eval("location.hash")
        # A search by token string given in the URL.
        token = insp.top_token(7)
        browser.eval(f"location.hash = 'q=' + encodeURIComponent({json.dumps(token)})")
        ids = browser.wait_for(
            "(() => { const r = Array.from(document.querySelectorAll('tr.feature-row'))"
            ".map(r => +r.dataset.id); return r.includes(7) && r; })()"
        )
        expected = sorted(i for i in range(insp.d_sae) if token.lower() in insp.top_token(i).lower())
        assert sorted(ids) == expected and len(ids) < insp.d_sae
        # Sorting by clicking the max-activation header (descending).
        browser.eval("location.hash = ''")
        browser.wait_for("document.querySelectorAll('tr.feature-row').length === 96")
        browser.eval("document.querySelector('th[data-key=max]').click()")
        first = browser.eval("document.querySelector('tr.feature-row').dataset.id")
        assert int(first) == _first_by(insp.max_activation)
        # Clicking a row opens its page; examples (from a lazily loaded chunk) show highlighted tokens.
        j = int(np.argmax(insp.arrays["fires"]))
        browser.eval(f"location.hash = 'q={j}'")
        browser.wait_for(f"!!document.querySelector('tr.feature-row[data-id=\"{j}\"]')")
        browser.eval(f"document.querySelector('tr.feature-row[data-id=\"{j}\"]').click()")
        browser.wait_for("document.querySelectorAll('#top-examples .example').length")
        feat = insp.feature(j)
        assert browser.eval("document.getElementById('feature-title').textContent") == f"Feature {j}"
        assert browser.eval("document.querySelectorAll('#top-examples .example').length") == len(feat.top)
        assert browser.eval("document.querySelectorAll('#random-examples .example').length") == len(feat.random)
        assert (
            browser.eval("document.querySelector('#top-examples .example .tok.c').textContent")
            == feat.top[0].tokens[feat.top[0].centre]
        )
        assert browser.eval("document.querySelectorAll('#histogram rect.bar').length") > 0
        assert browser.eval("document.querySelectorAll('#neighbours a').length") == 8
        assert "best true feature" in browser.eval("document.getElementById('gt').textContent")
        shot = browser.screenshot(tmp_path / "feature.png")
        requests = [
            e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"
        ]
        assert requests and all(u.startswith("file://") for u in requests), requests
    finally:
        browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
