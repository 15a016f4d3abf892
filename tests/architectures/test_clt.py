"""The cross-layer transcoder's forward, loss and gradients against a NumPy reference (3 layers), its TopK
variant, its export read as circuit-tracer reads it, and the errors of families that cannot transcode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae.architectures import FAMILIES, make_sae
from sae.architectures.clt import CLTConfig
from sae.errors import ConfigError, DataError
from sae.export_clt import export_clt, load_clt

L, D_IN, D_OUT, F, B = 3, 5, 4, 6, 7
LAM, C, LAM_P = 0.7, 4.0, 0.01


def params_and_data(activation="jumprelu", seed=0):
    cfg = CLTConfig(d_sae=F, activation=activation, k=2, tanh_scale=C, preact_coefficient=LAM_P, bandwidth=0.5)
    clt = make_sae(cfg, D_IN, D_OUT, L)
    params = clt.init_params(jax.random.PRNGKey(seed), jnp.zeros((L, D_OUT)))
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    if "threshold" in params:
        params["threshold"] = jnp.abs(params["threshold"]) * 0.5
    x = jnp.asarray(rng.normal(size=(B, L, D_IN)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(B, L, D_OUT)), jnp.float32)
    return clt, params, x, y


def np_clt(p, x, y):
    """The spec in NumPy: h, a, ŷ, and the three loss terms (means over the batch)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    h = np.einsum("bld,ldf->blf", x, p["W_enc"]) + p["b_enc"]
    a = h * (h > p["threshold"])
    y_hat = np.zeros((B, L, D_OUT)) + p["b_dec"]
    for source in range(L):
        for target in range(source, L):
            y_hat[:, target] += a[:, source] @ p[f"W_dec_{source}"][:, target - source]
    norms = np.stack([np.sqrt((p[f"W_dec_{source}"] ** 2).sum(axis=(1, 2))) for source in range(L)])  # [L, F]
    mse = ((y - y_hat) ** 2).sum(axis=(1, 2)).mean()
    tanh = np.tanh(C * norms * a).sum(axis=(1, 2)).mean()
    preact = (np.maximum(p["threshold"] - h, 0) * norms).sum(axis=(1, 2)).mean()
    return {"h": h, "a": a, "y_hat": y_hat, "norms": norms, "mse": mse, "tanh": tanh, "preact": preact}


def test_forward_and_loss_match_numpy():
    clt, params, x, y = params_and_data()
    out = jax.jit(clt.forward)(params, {}, x, y, jnp.zeros(clt.n_latents, bool), jnp.float32(LAM))
    ref = np_clt(params, x, y)
    np.testing.assert_allclose(out.x_hat, ref["y_hat"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.terms["mse_loss"], ref["mse"], rtol=1e-5)
    np.testing.assert_allclose(out.terms["tanh_loss"], ref["tanh"], rtol=1e-5)
    np.testing.assert_allclose(out.terms["preact_loss"], ref["preact"], rtol=1e-5)
    np.testing.assert_allclose(out.loss, ref["mse"] + LAM * ref["tanh"] + LAM_P * ref["preact"], rtol=1e-5)
    active = ref["a"] != 0
    np.testing.assert_array_equal(out.fire_counts, active.sum(axis=0).reshape(-1))
    for layer in range(L):
        np.testing.assert_allclose(out.terms[f"l0_layer_{layer}"], active[:, layer].sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(clt.decoder_norms(params), ref["norms"].reshape(-1), rtol=1e-5)
    # inference (encode, decode) is the same computation
    np.testing.assert_allclose(clt.decode(params, clt.encode(params, x, {})), ref["y_hat"], rtol=1e-5, atol=1e-5)


def test_gradients_of_the_decoder_terms_match_numpy():
    """∂/∂W_dec_l of the concatenated-norm penalties and of the MSE, analytic in NumPy."""
    clt, params, x, y = params_and_data(seed=1)
    ref = np_clt(params, x, y)
    dead = jnp.zeros(clt.n_latents, bool)
    grads = {
        term: jax.grad(lambda p, t=term: clt.forward(p, {}, x, y, dead, jnp.float32(LAM)).terms[t])(params)
        for term in ("tanh_loss", "preact_loss", "mse_loss")
    }
    a, h, norms = ref["a"], ref["h"], ref["norms"]
    theta = np.asarray(params["threshold"], np.float64)
    for source in range(L):
        w = np.asarray(params[f"W_dec_{source}"], np.float64)  # [F, L − source, D_OUT]
        unit = w / norms[source][:, None, None]
        # d/dW tanh(c n a) = c a sech²(c n a) ∂n/∂W,  ∂n/∂W = W / n
        coef = (C * a[:, source] / np.cosh(C * norms[source] * a[:, source]) ** 2).mean(axis=0)
        np.testing.assert_allclose(
            grads["tanh_loss"][f"W_dec_{source}"], coef[:, None, None] * unit, rtol=1e-4, atol=1e-6
        )
        coef = np.maximum(theta[source] - h[:, source], 0).mean(axis=0)
        np.testing.assert_allclose(
            grads["preact_loss"][f"W_dec_{source}"], coef[:, None, None] * unit, rtol=1e-4, atol=1e-6
        )
        residual = np.asarray(y, np.float64) - ref["y_hat"]  # [B, L, D_OUT]
        mse_grad = -2 * np.einsum("bf,bmd->fmd", a[:, source], residual[:, source:]) / B
        np.testing.assert_allclose(grads["mse_loss"][f"W_dec_{source}"], mse_grad, rtol=1e-4, atol=1e-5)


def test_threshold_learns_from_the_penalty_through_the_pseudo_gradient():
    """θ's gradient of the tanh penalty is the JumpReLU's straight-through one: −(θ/ε) K((h − θ)/ε) times
    ∂penalty/∂a = c n sech²(c n a), summed over the batch (mean: / B)."""
    clt, params, x, y = params_and_data(seed=2)
    ref = np_clt(params, x, y)
    dead = jnp.zeros(clt.n_latents, bool)
    grad = jax.grad(lambda p: clt.forward(p, {}, x, y, dead, jnp.float32(LAM)).terms["tanh_loss"])(params)
    theta = np.asarray(params["threshold"], np.float64)
    eps = clt.cfg.bandwidth
    kernel = (np.abs((ref["h"] - theta) / eps) < 0.5).astype(float)
    dpen = C * ref["norms"] / np.cosh(C * ref["norms"] * ref["a"]) ** 2
    expected = (dpen * -(theta / eps) * kernel).sum(axis=0) / B
    # the pre-activation loss has no θ in a, but ReLU(θ − h) is linear in θ: left out by taking tanh_loss only
    np.testing.assert_allclose(grad["threshold"], expected, rtol=1e-4, atol=1e-6)


def test_topk_keeps_k_per_layer():
    clt, params, x, y = params_and_data("topk")
    a = np.asarray(clt.encode(params, x, {}))
    h = np.einsum("bld,ldf->blf", np.asarray(x), np.asarray(params["W_enc"])) + np.asarray(params["b_enc"])
    kth = np.sort(h, axis=-1)[..., -2:-1]
    np.testing.assert_allclose(a, np.where(h >= kth, np.maximum(h, 0), 0), rtol=1e-5, atol=1e-6)
    assert ((a != 0).sum(-1) <= 2).all()
    out = clt.forward(params, {}, x, y, jnp.zeros(clt.n_latents, bool), jnp.float32(LAM))
    assert set(out.terms) == {"mse_loss", *(f"l0_layer_{i}" for i in range(L))}


def test_per_layer_methods_equal_the_batched_forward():
    """encode_layer / decode_layer (what the replacement model uses) give the batched encode / decode."""
    for activation in ("jumprelu", "topk"):
        clt, params, x, _ = params_and_data(activation, seed=3)
        acts = [clt.encode_layer(params, layer, x[:, layer]) for layer in range(L)]
        y_hat = clt.decode(params, clt.encode(params, x, {}))
        for layer in range(L):
            np.testing.assert_allclose(clt.decode_layer(params, acts, layer), y_hat[:, layer], rtol=1e-5, atol=1e-5)


def np_circuit_tracer(directory, x):
    """circuit-tracer's reading of the layout (load_clt's state dict and CrossLayerTranscoder.forward), in
    NumPy: W_enc_l [F, d] rows, JumpReLU h · 1[h > θ], decoders W_dec_l [F, L − l, d]."""
    from safetensors.numpy import load_file

    enc = [load_file(str(directory / f"W_enc_{i}.safetensors")) for i in range(L)]
    w_enc = np.stack([e[f"W_enc_{i}"] for i, e in enumerate(enc)])  # [L, F, d]
    b_enc = np.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)])
    b_dec = np.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)])
    h = np.einsum("lbd,lfd->lbf", np.moveaxis(x, 1, 0), w_enc) + b_enc[:, None]
    if f"threshold_{0}" in enc[0]:
        threshold = np.stack([e[f"threshold_{i}"] for i, e in enumerate(enc)])[:, None]
        a = h * (h > threshold)
    else:
        a = np.maximum(h, 0)
    out = np.zeros((L, x.shape[0], D_OUT)) + b_dec[:, None]
    for i in range(L):
        w_dec = load_file(str(directory / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
        out[i:] += np.einsum("bf,fmd->mbd", a[i], w_dec)
    return np.moveaxis(out, 0, 1)


def test_export_reads_as_circuit_tracer_reads_it(tmp_path):
    clt, params, x, _ = params_and_data(seed=4)
    scale = 1.7  # trained on x·scale: the export takes raw x
    sites_in = [f"blocks.{i}.ln2.hook_normalized" for i in range(L)]
    sites_out = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    export_clt(tmp_path, clt, params, scale, sites_in, sites_out, {"model_name": "tiny"})
    expected = clt.decode(params, clt.encode(params, x * scale, {}))
    np.testing.assert_allclose(np_circuit_tracer(tmp_path, np.asarray(x)), expected, rtol=1e-4, atol=1e-5)
    loaded = load_clt(tmp_path)
    np.testing.assert_allclose(
        loaded.clt.decode(loaded.params, loaded.clt.encode(loaded.params, x, {})), expected, rtol=1e-4, atol=1e-5
    )
    assert loaded.input_sites == sites_in and loaded.output_sites == sites_out
    assert loaded.config["feature_input_hook"] == "ln2.hook_normalized"
    assert loaded.config["feature_output_hook"] == "hook_mlp_out"
    assert loaded.config["model_kind"] == "cross_layer_transcoder"
    (tmp_path / "W_dec_1.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="W_dec_1.safetensors is truncated or damaged"):
        load_clt(tmp_path)


def test_shape_errors_name_the_layers():
    clt, params, x, _ = params_and_data()
    with pytest.raises(DataError, match=r"expected floating point \(\.\.\., n_layers=3, d_in=5\)"):
        clt.encode(params, x[:, :2], {})


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("gated", {"d_out": 8}, "sae=gated cannot be a transcoder"),
        ("topk", {"skip": True}, "sae.skip=true needs pairs"),
        ("topk", {"n_layers": 2, "d_out": 8}, "data.layers is for sae=clt"),
        ("clt", {}, "sae=clt reads every layer"),
        ("topk", {"d_out": 8, "cfg_d_out": 6}, "sae.d_out=6 does not match the target's width 8"),
    ],
)
def test_family_errors(name, kwargs, message):
    cls = FAMILIES[name]
    fields = {"d_sae": 16}
    if kwargs.pop("skip", False):
        fields["skip"] = True
    if "cfg_d_out" in kwargs:
        fields["d_out"] = kwargs.pop("cfg_d_out")
    with pytest.raises(ConfigError, match=message):
        make_sae(cls.config(**fields), 8, **kwargs)


def test_clt_has_no_skip():
    with pytest.raises(ConfigError, match="a CLT has no skip path"):
        CLTConfig(d_sae=8, skip=True).check()


def test_sparse_topk_step_equals_the_dense_computation():
    """The TopK CLT trains on the sparse path (k columns of each encoder, k gathered decoder rows): its ŷ,
    fire counts and gradients equal those of the dense formula decode(ReLU(TopK(h)))."""
    clt, params, x, y = params_and_data("topk", seed=5)
    dead = jnp.zeros(clt.n_latents, bool)

    def sparse(p):
        out = clt.forward(p, {}, x, y, dead, jnp.float32(0))
        return out.loss, out

    def dense(p):
        y_hat = clt.decode(p, clt.encode(p, x, {}))
        return jnp.mean(jnp.sum(jnp.square(y - y_hat), axis=(-2, -1))), y_hat

    (loss, out), grads = jax.value_and_grad(sparse, has_aux=True)(params)
    (loss_dense, y_hat), grads_dense = jax.value_and_grad(dense, has_aux=True)(params)
    np.testing.assert_allclose(out.x_hat, y_hat, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, loss_dense, rtol=1e-5)
    active = np.asarray(clt.encode(params, x, {})) != 0
    np.testing.assert_array_equal(out.fire_counts, active.sum(axis=0).reshape(-1))
    for name in grads:
        np.testing.assert_allclose(grads[name], grads_dense[name], rtol=1e-4, atol=1e-5, err_msg=name)
