"""sae-inspect on transcoder runs: a TopK per-layer transcoder (d_out ≠ d_in) inspected by its encoder on its
input store, and cross-layer transcoders (JumpReLU and TopK, 3 layers) as L·F layer-major features on their
layers' input stores, every statistic, example, context value, decoder norm and neighbour against NumPy; the
browser's CLT feature page in headless Chromium."""

import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from chromium import Chromium, _chromium

from sae.architectures import make_sae
from sae.architectures.clt import CLTConfig
from sae.architectures.topk import TopKConfig
from sae.data.store import StoreWriter
from sae.errors import DataError
from sae.export import export_sae
from sae.export_clt import export_clt
from sae.inspect import inspect_run, load

L, D_IN, D_OUT, F = 3, 6, 4, 8  # layers, widths, features per layer
N, SEQ, SHARD, VOCAB = 1500, 25, 500, 30  # rows (3 shards; batches of 512: the last one partial)
SCALE = 1.5  # the input scale folded into the exports: the rows are raw x
IN_SITE, OUT_SITE = "ln2.hook_normalized", "hook_mlp_out"
KW = {"batch_size": 512, "top_k": 4, "n_random": 4, "random_stride": 4, "context_before": 2, "context_after": 1}


def layer_inputs() -> np.ndarray:
    """x [N, L, D_IN]: every layer's input of every row (float32)."""
    return np.random.default_rng(0).normal(size=(N, L, D_IN)).astype(np.float32)


def token_ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, N)


def write_store(path, x: np.ndarray, site: str):
    """A float32 store of x [N, d] with the tokens and positions of N // SEQ sequences, its site as hook_name."""
    provenance = {"source": "test", "hook_name": site}
    with StoreWriter(path, x.shape[1], "float32", SHARD, provenance=provenance, with_tokens=True) as writer:
        writer.append(x, tokens=token_ids(), positions=np.arange(N) % SEQ)
    (path / "vocab.json").write_text(json.dumps([f"t{i}" for i in range(VOCAB)]))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A multi-site cache of layers 0..2's input sites (their output sites are never read by sae-inspect)."""
    root = tmp_path_factory.mktemp("cache")
    x = layer_inputs()
    for layer in range(L):
        write_store(root / f"blocks.{layer}.{IN_SITE}", x[:, layer], f"blocks.{layer}.{IN_SITE}")
    return root, x


def random_params(sae, b_dec_shape, seed: int) -> dict[str, jax.Array]:
    """The family's params, redrawn from N(0, 1) (thresholds |·|/2) so that features fire at many densities."""
    shapes = sae.init_params(jax.random.PRNGKey(seed), jnp.zeros(b_dec_shape))
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in shapes.items()}
    if "threshold" in params:
        params["threshold"] = np.abs(params["threshold"]) * 0.5
    return {k: jnp.asarray(v) for k, v in params.items()}


def np_clt_acts(params, x: np.ndarray, activation: str, k: int) -> np.ndarray:
    """a [N, L·F] layer-major: a_i^ℓ = JumpReLU_θ(x^ℓ·s W_enc^ℓ + b_enc^ℓ) (or ReLU(TopK_k)) in NumPy."""
    p = {name: np.asarray(v, np.float64) for name, v in params.items()}
    h = np.einsum("nld,ldf->nlf", x.astype(np.float64) * SCALE, p["W_enc"]) + p["b_enc"]
    if activation == "jumprelu":
        a = h * (h > p["threshold"])
    else:
        kth = -np.sort(-h, axis=-1)[..., k - 1 : k]
        a = np.where(h >= kth, np.maximum(h, 0), 0)
    return a.reshape(len(x), L * F).astype(np.float32)


@pytest.fixture(scope="module", params=["jumprelu", "topk"])
def clt_run(request, cache, tmp_path_factory):
    """A CLT run directory (RUN/sae in circuit-tracer's layout with the run config) and its inspection."""
    root, x = cache
    clt = make_sae(CLTConfig(d_sae=F, activation=request.param, k=3), D_IN, D_OUT, L)
    params = random_params(clt, (L, D_OUT), seed=2)
    run = tmp_path_factory.mktemp(f"clt_{request.param}")
    data = {"name": "cached", "path": str(root), "layers": "all", "input_site": IN_SITE, "output_site": OUT_SITE}
    sites = [f"blocks.{layer}.{IN_SITE}" for layer in range(L)], [f"blocks.{layer}.{OUT_SITE}" for layer in range(L)]
    export_clt(run / "sae", clt, params, SCALE, *sites, {"sae_jax_run": {"config": {"data": data}}})
    insp = inspect_run(run, **KW)
    return insp, run, params, np_clt_acts(params, x, request.param, 3), request.param


def test_clt_statistics_and_examples_equal_numpy(clt_run):
    """L·F features numbered layer-major: fires, max, sums, L0 and top examples are NumPy's over a_i^ℓ; the
    random sample is of firing rows with their own activation."""
    insp, _, _, a, activation = clt_run
    assert insp.d_sae == L * F and insp.meta["kind"] == "clt" and insp.meta["features_per_layer"] == F
    assert insp.meta["dictionary"] == (
        f"{activation} cross-layer transcoder, {L} layers × {F} features: blocks.0.{IN_SITE} … blocks.2.{IN_SITE} "
        f"→ blocks.0.{OUT_SITE} … blocks.2.{OUT_SITE}"
    )
    np.testing.assert_array_equal(insp.arrays["fires"], (a > 0).sum(0))
    np.testing.assert_allclose(insp.arrays["max"], a.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(insp.arrays["total"], a.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(insp.l0[1], np.bincount((a > 0).sum(1), minlength=L * F + 1))
    order = np.argsort(-a, axis=0, kind="stable")[:4].T  # [L·F, 4]
    expected = np.take_along_axis(a.T, order, axis=1)
    np.testing.assert_array_equal(insp.arrays["top_rows"], np.where(expected > 0, order, -1))
    np.testing.assert_allclose(insp.arrays["top_values"], expected, rtol=1e-5, atol=1e-6)
    rows, values = insp.arrays["random_rows"], insp.arrays["random_values"]
    got = rows >= 0
    np.testing.assert_allclose(values[got], a[rows[got], np.nonzero(got)[0]], rtol=1e-5, atol=1e-6)
    assert (rows[got] % 4 == 0).all()
    j = int(np.argmax(insp.arrays["fires"][F:])) + F  # a feature of layer ≥ 1
    assert insp.feature(j).layer == j // F and insp.layer(5) == 0


def test_clt_context_values_are_the_features_own(clt_run, cache):
    """Each context token's value is the feature's activation a_i^ℓ on that row (its layer's input); the
    centre's is the example's value from the statistics pass."""
    insp, _, _, a, _ = clt_run
    tokens = token_ids()
    for j in range(0, L * F, 3):
        for ex in insp.feature(j).top + insp.feature(j).random:
            r = ex.row
            window = [q for q in range(r - 2, r + 2) if 0 <= q < N and q // SEQ == r // SEQ]
            assert ex.tokens == [f"t{tokens[q]}" for q in window]
            np.testing.assert_allclose(ex.values, a[window, j], rtol=1e-5, atol=1e-5)
            assert window[ex.centre] == r and ex.values[ex.centre] == pytest.approx(ex.value, rel=1e-5, abs=1e-6)


def test_clt_decoder_norms_and_neighbours(clt_run):
    """decoder_layer_norms [L·F, L] are ‖W_dec_ℓ[i, m − ℓ]‖ (0 before ℓ); neighbours are by the decoders into
    every layer side by side (zeros before the feature's layer); each chunk's "dn" is the feature's row."""
    insp, run, params, _, _ = clt_run
    norms = np.zeros((L, F, L), np.float32)
    rows = np.zeros((L, F, L, D_OUT), np.float32)
    for layer in range(L):
        w = np.asarray(params[f"W_dec_{layer}"], np.float64)
        norms[layer, :, layer:] = np.sqrt((w**2).sum(-1))
        rows[layer, :, layer:] = w
    norms, rows = norms.reshape(L * F, L), rows.reshape(L * F, L * D_OUT)
    np.testing.assert_allclose(insp.arrays["decoder_layer_norms"], norms, rtol=1e-6)
    np.testing.assert_allclose(insp.feature(F + 2).decoder_layer_norms, norms[F + 2], rtol=1e-6)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    np.testing.assert_allclose(insp.arrays["neighbour_cosines"], -np.sort(-cos, axis=1)[:, :8], atol=1e-5)
    np.testing.assert_allclose(insp.decoder(), rows, rtol=1e-6)
    chunk = json.loads((run / "inspect" / "data" / "chunk_00000.js").read_text()[len("SAE_CHUNK(") : -3])
    feature = chunk["features"][F + 2]
    assert feature["id"] == F + 2 and feature["dn"][0] == 0
    np.testing.assert_allclose(feature["dn"][1:], norms[F + 2, 1:], rtol=1e-3)
    listing = json.loads((run / "inspect" / "features.js").read_text()[len("SAE_LIST(") : -3])
    assert listing["columns"]["layer"] == [i // F for i in range(L * F)]
    assert listing["meta"]["kind"] == "clt" and "cross-layer transcoder" in listing["meta"]["dictionary"]
    summary = json.loads((run / "inspect" / "summary.json").read_text())
    assert summary["dictionary"] == listing["meta"]["dictionary"] and summary["d_sae"] == L * F
    again = load(run).feature(F + 2)
    assert again.layer == 1 and np.array_equal(again.decoder_layer_norms, insp.feature(F + 2).decoder_layer_norms)


@pytest.mark.parametrize("clt_run", ["jumprelu"], indirect=True)
def test_clt_feature_page_shows_decoder_norms(clt_run, tmp_path):
    """A CLT feature's page (file://, headless Chromium) names its layer and lists its decoder norm into each
    layer: '–' before its own, the norm from it on."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH (.ci/run installs Debian's chromium)")
    insp, run, _, _, _ = clt_run
    j = F + 5  # layer 1
    browser = Chromium(binary, tempfile.mkdtemp(dir=tmp_path))
    try:
        browser.call("Page.navigate", browser.session, url=(run / "inspect" / "index.html").as_uri() + f"#f={j}")
        browser.wait_for("document.querySelectorAll('#decoder-norms tr.norms td').length")
        cells = browser.eval("Array.from(document.querySelectorAll('#decoder-norms tr.norms td'), c => c.textContent)")
        assert cells[0] == "\u2013" and len(cells) == L
        shown = [float(c) for c in cells[1:]]
        np.testing.assert_allclose(shown, insp.arrays["decoder_layer_norms"][j, 1:], rtol=5e-3)
        assert browser.eval("document.getElementById('layer').textContent") == f"layer 1 (feature 5 of {F})"
        assert "cross-layer transcoder" in browser.eval("document.getElementById('subtitle').textContent")
        browser.eval("location.hash = ''")
        browser.wait_for("document.querySelectorAll('tr.feature-row').length")
        assert browser.eval("document.querySelector('th[data-key=layer]') !== null")
    finally:
        browser.close()


@pytest.fixture(scope="module")
def transcoder_run(cache, tmp_path_factory):
    """A TopK transcoder blocks.0.ln2 → blocks.0.mlp_out (d_out = 4 ≠ d_in = 6) with ground truth in d_out."""
    root, x = cache
    sae = make_sae(TopKConfig(d_sae=10, k=3), D_IN, D_OUT)
    params = random_params(sae, (D_OUT,), seed=3)
    run = tmp_path_factory.mktemp("transcoder")
    target = root / f"blocks.0.{OUT_SITE}"  # never written: sae-inspect reads the input store only
    data = {"name": "cached", "path": str(root / f"blocks.0.{IN_SITE}"), "target": str(target)}
    export_sae(run / "sae", sae, params, {}, SCALE, metadata={"config": {"data": data}})
    truth = np.random.default_rng(4).normal(size=(7, D_OUT)).astype(np.float32)
    np.save(run / "ground_truth.npy", truth)
    return inspect_run(run, **KW), params, x[:, 0], truth


def test_transcoder_examples_by_encoder_activation(transcoder_run):
    """Statistics and top examples are NumPy's TopK encoder activation on the input rows; context values use
    the TopK rule's floor; ground truth is matched against the d_out-wide decoder rows."""
    insp, params, x, truth = transcoder_run
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = x.astype(np.float64) * SCALE @ p["W_enc"] + p["b_enc"]
    kth = -np.sort(-h, axis=1)[:, 2:3]
    f = np.where(h >= kth, np.maximum(h, 0), 0).astype(np.float32)
    np.testing.assert_array_equal(insp.arrays["fires"], (f > 0).sum(0))
    np.testing.assert_array_equal(insp.arrays["top_rows"][:, 0], np.where(f.max(0) > 0, f.argmax(0), -1))
    np.testing.assert_allclose(insp.arrays["max"], f.max(0), rtol=1e-5, atol=1e-6)
    for j in range(10):
        for ex in insp.feature(j).top:
            window = [q for q in range(ex.row - 2, ex.row + 2) if 0 <= q < N and q // SEQ == ex.row // SEQ]
            np.testing.assert_allclose(ex.values, f[window, j], rtol=1e-5, atol=1e-5)
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_array_equal(insp.arrays["gt_match"], (unit(p["W_dec"]) @ unit(truth).T).argmax(1))
    assert insp.meta["kind"] == "transcoder" and insp.meta["d_out"] == D_OUT
    assert insp.meta["dictionary"] == f"topk transcoder blocks.0.{IN_SITE} → blocks.0.{OUT_SITE}"
    assert insp.summary()["dictionary"] == insp.meta["dictionary"]


def test_a_sae_directory_of_neither_layout_is_one_line(tmp_path):
    (tmp_path / "sae").mkdir()
    (tmp_path / "sae" / "weights.bin").write_bytes(b"")
    with pytest.raises(DataError) as err:
        inspect_run(tmp_path, **KW)
    message = str(err.value)
    assert f"'{tmp_path / 'sae'}' holds neither cfg.json" in message and "config.yaml" in message
    assert "\n" not in message and not (tmp_path / "inspect").exists()
