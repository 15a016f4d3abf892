"""SAELens export: round trip through `load_sae`, the on-disk layout SAELens reads, and SAELens's own
loader reproducing our reconstructions (sae_lens and torch are test dependencies: the dev extra)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILY_TESTS
from safetensors.numpy import load_file

from sae.architectures import FAMILIES, make_sae
from sae.errors import DataError
from sae.export import CFG_FILENAME, WEIGHTS_FILENAME, export_sae, load_sae

D_IN, D_SAE, BATCH, SCALE = 16, 64, 32, 2.5

PER_LAYER = [name for name, family in FAMILIES.items() if not family.cross_layer]  # a CLT: test_clt.py
CONFIGS = {name: FAMILIES[name].config(d_sae=D_SAE) for name in PER_LAYER}  # TopK family: the default k = 6
EXPECTED = {name: t.saelens for name, t in FAMILY_TESTS.items()}  # family -> (SAELens arch, apply_b_dec_to_input)
SAELENS_TENSORS = {  # SAELens parameter names and shapes per architecture
    "standard": {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)},
    "topk": {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)},
    "jumprelu": {
        "W_enc": (D_IN, D_SAE),
        "b_enc": (D_SAE,),
        "threshold": (D_SAE,),
        "W_dec": (D_SAE, D_IN),
        "b_dec": (D_IN,),
    },
    "gated": {
        "W_enc": (D_IN, D_SAE),
        "b_gate": (D_SAE,),
        "r_mag": (D_SAE,),
        "b_mag": (D_SAE,),
        "W_dec": (D_SAE, D_IN),
        "b_dec": (D_IN,),
    },
}


def build(family: str, seed: int = 0):
    """(sae, params, buffers, x): init perturbed so every bias and threshold matters; x in raw units."""
    sae = make_sae(CONFIGS[family], D_IN)
    k_init, k_bdec, k_noise, k_x = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = sae.init_params(k_init, 0.3 * jax.random.normal(k_bdec, (D_IN,)))
    keys = dict(zip(sorted(params), jax.random.split(k_noise, len(params))))
    params = {name: v + 0.1 * jax.random.normal(keys[name], v.shape) for name, v in params.items()}
    x = jax.random.normal(k_x, (BATCH, D_IN)) / SCALE  # the SAE itself sees x·SCALE ~ unit scale
    buffers = sae.init_buffers()
    if family == "jumprelu":  # positive per-latent thresholds near the pre-activations' spread
        params["threshold"] = 0.5 * jnp.abs(params["threshold"]) + 0.3 * jax.random.uniform(keys["threshold"], (D_SAE,))
    if family in ("batchtopk", "matryoshka"):  # a threshold that cuts about half the positive r
        r = jax.nn.relu(x * SCALE @ params["W_enc"] + params["b_enc"] - params["b_dec"] @ params["W_enc"])
        buffers = {"threshold": jnp.median(r[r > 0])}
    return sae, params, buffers, x


def reference(sae, params, buffers, x, scale):
    f = sae.encode(params, x * scale, buffers)
    return f, sae.decode(params, f) / scale


@pytest.mark.parametrize("family", PER_LAYER)
def test_round_trip_reproduces_reconstructions(tmp_path, family):
    sae, params, buffers, x = build(family)
    export_sae(tmp_path, sae, params, buffers, input_scale=SCALE)
    loaded = load_sae(tmp_path)
    f_ref, x_hat_ref = reference(sae, params, buffers, x, SCALE)

    assert loaded.architecture == family
    # folding leaves pre-activations unchanged, so codes match exactly up to float rounding
    np.testing.assert_allclose(loaded.encode(x), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded(x), x_hat_ref, rtol=1e-5, atol=1e-5)
    # the test is not vacuous: some latents are active, some are cut, and b_dec matters
    active = np.asarray(f_ref > 0)
    assert 0 < active.mean() < 1
    assert float(jnp.abs(x_hat_ref).max()) > 0.1


@pytest.mark.parametrize("family", PER_LAYER)
def test_on_disk_layout_is_saelens(tmp_path, family):
    sae, params, buffers, x = build(family)
    out = export_sae(
        tmp_path / "sae",
        sae,
        params,
        buffers,
        input_scale=SCALE,
        metadata={"model_name": "toy", "hook_name": "blocks.0.hook_resid_post"},
    )
    assert out == tmp_path / "sae"
    cfg = json.loads((out / CFG_FILENAME).read_text())
    arch, pre_bias = EXPECTED[family]
    assert cfg["architecture"] == arch
    assert cfg["apply_b_dec_to_input"] is pre_bias
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["dtype"] == "float32" and cfg["normalize_activations"] == "none"
    if arch == "topk":
        assert cfg["k"] == 6 and cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert "k" not in cfg
    meta = cfg["metadata"]
    assert meta["model_name"] == "toy" and meta["hook_name"] == "blocks.0.hook_resid_post"
    assert meta["sae_lens_version"] >= "6"
    assert meta["sae_jax"]["architecture"] == family
    assert meta["sae_jax"]["input_scale"] == SCALE and meta["sae_jax"]["config"]["d_sae"] == D_SAE

    tensors = load_file(str(out / WEIGHTS_FILENAME))
    assert {k: v.shape for k, v in tensors.items()} == SAELENS_TENSORS[arch]
    assert all(v.dtype == np.float32 for v in tensors.values())
    # the input scale is folded: W_enc·s, W_dec/s, b_dec/s; latent-side tensors unchanged
    np.testing.assert_allclose(tensors["W_enc"], SCALE * np.asarray(params["W_enc"]), rtol=1e-6)
    np.testing.assert_allclose(tensors["W_dec"], np.asarray(params["W_dec"]) / SCALE, rtol=1e-6)
    np.testing.assert_allclose(tensors["b_dec"], np.asarray(params["b_dec"]) / SCALE, rtol=1e-6)
    if family in ("batchtopk", "matryoshka"):
        np.testing.assert_allclose(tensors["threshold"], np.full(D_SAE, float(buffers["threshold"])), rtol=1e-6)
    if family == "jumprelu":
        np.testing.assert_allclose(tensors["threshold"], params["threshold"], rtol=1e-6)


def test_unit_scale_and_unset_batchtopk_threshold(tmp_path):
    """input_scale 1 changes nothing; the unset threshold (−1) exports as 0 and keeps f = ReLU(z)."""
    sae, params, _, x = build("batchtopk", seed=1)
    buffers = sae.init_buffers()
    assert float(buffers["threshold"]) < 0
    export_sae(tmp_path, sae, params, buffers, input_scale=1.0)
    loaded = load_sae(tmp_path)
    np.testing.assert_array_equal(loaded.params["threshold"], np.zeros(D_SAE))
    np.testing.assert_allclose(loaded.params["W_enc"], params["W_enc"], rtol=1e-6)
    _, x_hat_ref = reference(sae, params, buffers, x, 1.0)
    np.testing.assert_allclose(loaded(x), x_hat_ref, rtol=1e-5, atol=1e-5)


def test_loader_follows_saelens_jumprelu_rule(tmp_path):
    """A file with negative thresholds (not ours) is read by SAELens's rule ReLU(z)·1[z > θ]."""
    from safetensors.numpy import save_file

    sae, params, buffers, x = build("jumprelu")
    export_sae(tmp_path, sae, params, buffers, input_scale=1.0)
    tensors = load_file(str(tmp_path / WEIGHTS_FILENAME))
    tensors["threshold"] = np.full(D_SAE, -0.5, np.float32)
    save_file(tensors, str(tmp_path / WEIGHTS_FILENAME))
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    expected = np.maximum(pre, 0) * (pre > -0.5)
    np.testing.assert_allclose(load_sae(tmp_path).encode(x), expected, rtol=1e-5, atol=1e-6)
    assert float(load_sae(tmp_path).encode(x).min()) == 0.0


def test_export_rejects_bad_inputs(tmp_path):
    sae, params, buffers, _ = build("jumprelu")
    with pytest.raises(ValueError, match="input_scale"):
        export_sae(tmp_path, sae, params, buffers, input_scale=0.0)
    with pytest.raises(ValueError, match="threshold"):
        export_sae(tmp_path, sae, {**params, "threshold": params["threshold"] - 10}, buffers, 1.0)
    with pytest.raises(ValueError, match="reserved"):
        export_sae(tmp_path, sae, params, buffers, 1.0, metadata={"sae_jax": 1})
    with pytest.raises(ValueError, match="b_enc"):
        export_sae(tmp_path, sae, {k: v for k, v in params.items() if k != "b_enc"}, buffers, 1.0)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_sae(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)

    sae, params, buffers, _ = build("relu")
    export_sae(tmp_path / "a", sae, params, buffers, 1.0)
    (tmp_path / "a" / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_sae(tmp_path / "a")

    export_sae(tmp_path / "b", sae, params, buffers, 1.0)
    cfg_path = tmp_path / "b" / CFG_FILENAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "architecture": "mystery"}))
    with pytest.raises(ValueError, match="mystery.*expected one of"):
        load_sae(tmp_path / "b")
    cfg["metadata"]["sae_jax"]["architecture"] = "mystery"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mystery"):
        load_sae(tmp_path / "b")


@pytest.mark.parametrize("family", PER_LAYER)
def test_saelens_loads_export(tmp_path, family):
    """SAELens's own loader reads the export and reproduces our reconstructions (torch, CPU)."""
    import sae_lens  # imported here: it takes seconds (torch), and only these tests need it
    import torch

    sae, params, buffers, x = build(family)
    export_sae(tmp_path, sae, params, buffers, input_scale=SCALE, metadata={"hook_name": "h"})

    theirs = sae_lens.SAE.load_from_disk(tmp_path, device="cpu")
    assert theirs.cfg.architecture() == EXPECTED[family][0]
    assert theirs.cfg.metadata.sae_jax["architecture"] == family
    assert theirs.cfg.metadata.hook_name == "h"
    with torch.no_grad():
        x_t = torch.from_numpy(np.array(x))
        f_theirs = theirs.encode(x_t).numpy()
        x_hat_theirs = theirs(x_t).numpy()
    f_ref, x_hat_ref = reference(sae, params, buffers, x, SCALE)
    np.testing.assert_allclose(f_theirs, f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat_theirs, x_hat_ref, rtol=1e-5, atol=1e-5)


def test_loaded_sae_takes_any_leading_dims_and_names_the_expected_width(tmp_path):
    sae, params, buffers, x = build("topk")
    loaded = load_sae(export_sae(tmp_path, sae, params, buffers, input_scale=SCALE))
    f = loaded.encode(x)
    np.testing.assert_allclose(loaded.encode(x[3]), f[3], rtol=1e-6, atol=1e-6)  # a single vector [d_in]
    np.testing.assert_allclose(loaded(x.reshape(4, 8, D_IN)), loaded(x).reshape(4, 8, D_IN), rtol=1e-6, atol=1e-6)
    with pytest.raises(DataError, match=re.escape(f"encode: x has shape (32, 7); expected (..., d_in={D_IN})")):
        loaded.encode(x[:, :7])
    with pytest.raises(DataError, match=re.escape(f"encode: x has shape (7,); expected (..., d_in={D_IN})")):
        loaded(x[0, :7])
    with pytest.raises(DataError, match="encode: x has dtype int32; expected floating point"):
        loaded.encode(np.zeros((2, D_IN), np.int32))
    with pytest.raises(DataError, match=re.escape(f"decode: f has shape (32, 5); expected (..., d_sae={D_SAE})")):
        loaded.decode(f[:, :5])


DAMAGE = {  # file -> its damaged bytes, from the intact ones
    "weights_truncated": (WEIGHTS_FILENAME, lambda b: b[: len(b) // 2], "is truncated or damaged (SafetensorError: "),
    "weights_empty": (WEIGHTS_FILENAME, lambda b: b"", "is truncated or damaged (SafetensorError: "),
    "weights_junk": (WEIGHTS_FILENAME, lambda b: b"\xff" * 64, "is truncated or damaged (SafetensorError: "),
    "cfg_truncated": (CFG_FILENAME, lambda b: b[: len(b) // 2], "is truncated or damaged (JSONDecodeError: "),
    "cfg_binary": (CFG_FILENAME, lambda b: b"\x89PNG\x00\xff", "is truncated or damaged (UnicodeDecodeError: "),
    "cfg_not_an_object": (CFG_FILENAME, lambda b: b"[1, 2]", "holds a JSON list, not an object"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_truncated_or_damaged_export_names_the_file(tmp_path, damage):
    name, corrupt, expected = DAMAGE[damage]
    sae, params, buffers, _ = build("relu")
    path = export_sae(tmp_path, sae, params, buffers, 1.0) / name
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataError) as refused:
        load_sae(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"{path} {expected}") and message.endswith(
        "re-export the run (sae.export.export_sae, or train it again)"
    )
    assert "\n" not in message


def test_nan_weights_are_named(tmp_path):
    sae, params, buffers, _ = build("relu")
    export_sae(tmp_path, sae, {**params, "b_enc": params["b_enc"].at[3].set(jnp.nan)}, buffers, 1.0)
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path / WEIGHTS_FILENAME}: b_enc holds NaN or infinite values")
    ):
        load_sae(tmp_path)
