"""Every SAE family against an independent NumPy implementation of its equations
(docs/architectures.md), plus the sparse/custom-gradient building blocks in sae/architectures/sparse.py.

NumPy references work in float64 on the same float32 inputs; the JAX code runs in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILY_TESTS

from sae.architectures import FAMILIES as REGISTERED
from sae.architectures import make_sae
from sae.architectures.batchtopk import BatchTopKConfig, batch_threshold, kth_largest_nonnegative
from sae.architectures.gated import GatedConfig
from sae.architectures.jumprelu import JumpReLUConfig, jumprelu, step
from sae.architectures.matryoshka import MatryoshkaConfig, prefix_sizes
from sae.architectures.relu import ReLUConfig
from sae.architectures.relu_april import ReLUAprilConfig
from sae.architectures.sparse import exact_top_k, gather_sum, latent_sharded_top_k, take_with_sparse_grad
from sae.architectures.topk import TopKConfig
from sae.errors import DataError

B, D_IN, D_SAE, K = 32, 8, 48, 4
LAM = 0.3  # sparsity coefficient passed to forward
ALPHA = 0.25  # AuxK coefficient (larger than 1/32 so the term is visible in the loss)
DECAY = 0.9  # BatchTopK threshold EMA decay
BANDWIDTH = 0.2  # JumpReLU ε
K_AUX = 6  # TopK's explicit k_aux; BatchTopK and Matryoshka use the default d_in // 2 = 4
TOL = dict(rtol=1e-5, atol=1e-5)

FAMILIES = tuple(FAMILY_TESTS)
UNIT_NORM = tuple(name for name, t in FAMILY_TESTS.items() if t.unit_norm)


def make_cfg(name: str, prefixes: tuple[int, ...] = ()):
    if name == "relu":
        return ReLUConfig(d_sae=D_SAE, l1_coefficient=LAM)
    if name == "relu_april":
        return ReLUAprilConfig(d_sae=D_SAE, l1_coefficient=LAM)
    if name == "gated":
        return GatedConfig(d_sae=D_SAE, l1_coefficient=LAM)
    if name == "jumprelu":
        return JumpReLUConfig(d_sae=D_SAE, l0_coefficient=LAM, threshold_init=0.1, bandwidth=BANDWIDTH)
    if name == "topk":
        return TopKConfig(d_sae=D_SAE, k=K, k_aux=K_AUX, aux_coefficient=ALPHA)
    if name == "batchtopk":
        return BatchTopKConfig(d_sae=D_SAE, k=K, aux_coefficient=ALPHA, threshold_ema_decay=DECAY)
    if name == "matryoshka":
        return MatryoshkaConfig(
            d_sae=D_SAE, k=K, aux_coefficient=ALPHA, threshold_ema_decay=DECAY, prefixes=list(prefixes)
        )
    raise ValueError(name)


@functools.cache
def sae_and_fns(name: str, prefixes: tuple[int, ...] = ()):
    """(sae, jitted forward, jitted encode); one compilation per family/config."""
    sae = make_sae(make_cfg(name, prefixes), D_IN)
    return sae, jax.jit(sae.forward), jax.jit(sae.encode)


def perturbed_params(sae, seed: int = 0):
    """The family's init with every array perturbed, so biases are non-zero and W_enc ≠ W_decᵀ."""
    key = jax.random.PRNGKey(seed)
    params = sae.init_params(key, jax.random.normal(key, (D_IN,)))
    rng = np.random.default_rng(seed + 1)
    out = {}
    for name, v in params.items():
        v = np.asarray(v, np.float32)
        if name == "threshold":
            v = rng.uniform(0.05, 0.6, v.shape)
        else:
            v = v + 0.3 * rng.standard_normal(v.shape)
        out[name] = jnp.asarray(v, jnp.float32)
    return out


def inputs(seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(100 + seed)
    return jnp.asarray(rng.standard_normal((B, D_IN)) + 0.2, jnp.float32)


def dead_mask(n_dead: int) -> jax.Array:
    """[D_SAE] bool with n_dead dead latents spread over the dictionary."""
    dead = np.zeros(D_SAE, bool)
    dead[np.random.default_rng(n_dead).choice(D_SAE, n_dead, replace=False)] = True
    return jnp.asarray(dead)


# --- NumPy references ---------------------------------------------------------------------------


def np64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def relu(a):
    return np.maximum(a, 0.0)


def np_preacts(p, x, pre_bias):
    return ((x - p["b_dec"]) if pre_bias else x) @ p["W_enc"] + p["b_enc"]


def np_sqerr(x, x_hat):
    return np.mean(np.sum((x - x_hat) ** 2, axis=-1))


def np_topk_rows(r, k):
    """Keep the k largest entries of each row of r, zero elsewhere."""
    idx = np.argsort(-r, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(r)
    np.put_along_axis(out, idx, np.take_along_axis(r, idx, 1), 1)
    return out


def np_auxk_mask(z, dead, k_aux):
    """[batch, d_sae] bool: per row, the k_aux dead latents with the largest pre-activations."""
    dead_idx = np.flatnonzero(dead)
    mask = np.zeros(z.shape, bool)
    if dead_idx.size:
        order = np.argsort(-z[:, dead_idx], axis=1, kind="stable")[:, : min(k_aux, dead_idx.size)]
        np.put_along_axis(mask, dead_idx[order], True, 1)
    return mask


def np_variance(a):
    return np.mean(np.sum((a - a.mean(0)) ** 2, -1))


def np_auxk(p, x, x_hat, dead, k_aux):
    """AuxK: MSE of e = x − x̂ against ê = TopK_aux(ReLU(z) over dead latents) W_dec (no b_dec),
    times Var(x) / Var(e) (Gao et al.'s normalised MSE of the residual, on the main term's scale)."""
    z = np_preacts(p, x, True)
    mask = np_auxk_mask(z, np.asarray(dead), k_aux)
    if not mask.any():
        return 0.0
    return np_sqerr(x - x_hat, (relu(z) * mask) @ p["W_dec"]) * np_variance(x) / np_variance(x - x_hat)


def np_gated_parts(p, x):
    shared = (x - p["b_dec"]) @ p["W_enc"]
    return shared + p["b_gate"], np.exp(p["r_mag"]) * shared + p["b_mag"]


def np_encode(name, cfg, p, x, threshold):
    """The inference rule of each family."""
    if name == "relu":
        return relu(np_preacts(p, x, True))
    if name == "relu_april":
        return relu(np_preacts(p, x, False))
    if name == "topk":
        return np_topk_rows(relu(np_preacts(p, x, True)), cfg.k)
    if name in ("batchtopk", "matryoshka"):
        r = relu(np_preacts(p, x, True))
        return r * (r > threshold)
    if name == "jumprelu":
        z = np_preacts(p, x, False)
        return z * (z > p["threshold"])
    if name == "gated":
        pi_gate, pi_mag = np_gated_parts(p, x)
        return (pi_gate > 0) * relu(pi_mag)
    raise ValueError(name)


def np_batch_code(cfg, p, x, threshold):
    """BatchTopK training code and the updated inference threshold."""
    r = relu(np_preacts(p, x, True))
    n = cfg.k * x.shape[0]
    tau = np.sort(r.ravel())[-n]
    f = r * ((r >= tau) & (r > 0))
    smallest_kept = f[f > 0].min() if (f > 0).any() else 0.0
    new = (
        smallest_kept
        if threshold < 0
        else cfg.threshold_ema_decay * threshold + (1 - cfg.threshold_ema_decay) * smallest_kept
    )
    return f, tau, new


def np_forward(name, cfg, p, x, dead, lam, threshold=-1.0):
    """dict(loss, terms, x_hat, f, l0, fire_counts[, threshold]) of one training pass, from the equations."""
    p, x = np64(p), np.asarray(x, np.float64)
    out = {}
    k_aux = getattr(cfg, "k_aux", None) or D_IN // 2
    if name in ("relu", "relu_april"):
        f = relu(np_preacts(p, x, name == "relu"))
        x_hat = f @ p["W_dec"] + p["b_dec"]
        mse = np_sqerr(x, x_hat)
        if name == "relu":
            l1 = np.mean(np.abs(f).sum(-1))
        else:
            l1 = np.mean(f @ np.linalg.norm(p["W_dec"], axis=-1))
        terms = {"mse_loss": mse, "l1_loss": l1}
        loss = mse + lam * l1
    elif name == "topk":
        f = np_topk_rows(relu(np_preacts(p, x, True)), cfg.k)
        x_hat = f @ p["W_dec"] + p["b_dec"]
        mse, aux = np_sqerr(x, x_hat), np_auxk(p, x, x_hat, dead, k_aux)
        terms = {"mse_loss": mse, "auxk_loss": aux}
        loss = mse + cfg.aux_coefficient * aux
    elif name in ("batchtopk", "matryoshka"):
        f, _, out["threshold"] = np_batch_code(cfg, p, x, threshold)
        x_hat = f @ p["W_dec"] + p["b_dec"]
        mse, aux = np_sqerr(x, x_hat), np_auxk(p, x, x_hat, dead, k_aux)
        terms = {"mse_loss": mse, "auxk_loss": aux}
        loss = mse + cfg.aux_coefficient * aux
        if name == "matryoshka":
            sizes = list(cfg.prefixes) or [D_SAE // 16, D_SAE // 8, D_SAE // 4, D_SAE // 2]
            prefix = sum(np_sqerr(x, f[:, :m] @ p["W_dec"][:m] + p["b_dec"]) for m in sizes if m < D_SAE)
            terms["prefix_loss"] = prefix
            loss = loss + prefix
    elif name == "jumprelu":
        z = np_preacts(p, x, False)
        f = z * (z > p["threshold"])
        x_hat = f @ p["W_dec"] + p["b_dec"]
        mse, l0 = np_sqerr(x, x_hat), np.mean((z > p["threshold"]).sum(-1))
        terms = {"mse_loss": mse, "l0_loss": l0}
        loss = mse + lam * l0
    elif name == "gated":
        pi_gate, pi_mag = np_gated_parts(p, x)
        f = (pi_gate > 0) * relu(pi_mag)
        x_hat = f @ p["W_dec"] + p["b_dec"]
        mse = np_sqerr(x, x_hat)
        l1 = np.mean(relu(pi_gate).sum(-1))
        aux = np_sqerr(x, relu(pi_gate) @ p["W_dec"] + p["b_dec"])
        terms = {"mse_loss": mse, "l1_loss": l1, "gate_aux_loss": aux}
        loss = mse + lam * l1 + aux
    else:
        raise ValueError(name)
    active = f != 0
    out.update(loss=loss, terms=terms, x_hat=x_hat, f=f, l0=np.mean(active.sum(-1)), fire_counts=active.sum(0))
    return out


def check_forward(name, fwd, ref):
    assert set(fwd.terms) == set(ref["terms"]), (name, set(fwd.terms))
    for term, value in ref["terms"].items():
        np.testing.assert_allclose(fwd.terms[term], value, **TOL, err_msg=f"{name}.{term}")
    np.testing.assert_allclose(fwd.loss, ref["loss"], **TOL, err_msg=f"{name}.loss")
    np.testing.assert_allclose(fwd.x_hat, ref["x_hat"], **TOL, err_msg=f"{name}.x_hat")
    np.testing.assert_allclose(fwd.l0, ref["l0"], **TOL, err_msg=f"{name}.l0")
    np.testing.assert_array_equal(np.asarray(fwd.fire_counts), ref["fire_counts"], err_msg=f"{name}.fire_counts")
    if "threshold" in ref:
        np.testing.assert_allclose(fwd.buffers["threshold"], ref["threshold"], **TOL, err_msg=f"{name}.threshold")


# --- 1. every family: encode, decode, forward -------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_decode_match_numpy(name):
    """encode (the inference rule, with a set BatchTopK threshold θ = 0.3 and an unset one) and
    decode (f W_dec + b_dec) equal the NumPy equations."""
    sae, _, encode = sae_and_fns(name)
    params, x = perturbed_params(sae), inputs()
    buffers = sae.init_buffers()
    thresholds = (0.3, -1.0) if "threshold" in buffers else (None,)
    for theta in thresholds:
        buf = {"threshold": jnp.float32(theta)} if theta is not None else buffers
        f = encode(params, x, buf)
        ref = np_encode(name, sae.cfg, np64(params), np.asarray(x, np.float64), theta)
        np.testing.assert_allclose(f, ref, **TOL)
        assert 0 < np.count_nonzero(ref) < ref.size
    f = np.random.default_rng(3).standard_normal((B, D_SAE)).astype(np.float32)
    p = np64(params)
    np.testing.assert_allclose(sae.decode(params, jnp.asarray(f)), f @ p["W_dec"] + p["b_dec"], **TOL)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("n_dead", [0, 2, 16])
def test_forward_matches_numpy(name, n_dead):
    """forward's loss, every named term, x_hat, l0, fire_counts (and BatchTopK's threshold buffer) equal
    the NumPy equations; n_dead = 16 exercises AuxK with k_aux < #dead, 2 with #dead < k_aux, 0 none
    (AuxK then exactly 0). TopK uses an explicit k_aux = 6, BatchTopK/Matryoshka the default d_in // 2."""
    sae, forward, _ = sae_and_fns(name)
    params, x, dead = perturbed_params(sae, seed=n_dead), inputs(n_dead), dead_mask(n_dead)
    out = forward(params, sae.init_buffers(), x, x, dead, jnp.float32(LAM))
    ref = np_forward(name, sae.cfg, params, x, dead, LAM)
    check_forward(name, out, ref)
    if "auxk_loss" in ref["terms"]:
        if n_dead:
            assert ref["terms"]["auxk_loss"] > 0.1
        else:
            assert float(out.terms["auxk_loss"]) == 0.0


# --- 2. BatchTopK selection and threshold ---------------------------------------------------------


def test_kth_largest_nonnegative_matches_sort():
    """kth_largest_nonnegative(r, n) is exactly np.sort(r)[-n], including ties, zeros, n = 1, n = size
    and n beyond the number of positive entries (→ 0)."""
    rng = np.random.default_rng(0)
    r = np.maximum(rng.standard_normal((32, 48)), 0).astype(np.float32)
    r[3, :5] = r[4, :5]  # ties
    kth = jax.jit(kth_largest_nonnegative)  # n traced: one compilation per shape
    for n in (1, 7, 128, 500, int((r > 0).sum()), r.size):
        np.testing.assert_array_equal(kth(jnp.asarray(r), n), np.sort(r.ravel())[-n])
    big = np.abs(rng.standard_normal(1000) * 1e4).astype(np.float32)
    np.testing.assert_array_equal(kth(jnp.asarray(big), 37), np.sort(big)[-37])


def _candidate_only_threshold(r, k):
    cands = -np.sort(-r, axis=1)[:, : 4 * k]
    return np.sort(cands.ravel())[-k * r.shape[0]]


@pytest.mark.parametrize("heavy_rows", [(), (5,), (5, 9), (1, 5, 9, 20)])
def test_batch_threshold_exact_and_fallback(heavy_rows):
    """batch_threshold(r, k) equals the (k·batch)-th largest entry of r (np.sort), in the usual case
    and when rows hold more than 4k of the top entries (then the candidate-only answer is wrong: one
    such row takes the rows-in-full path, several the whole-array bisection)."""
    rng = np.random.default_rng(1)
    r = np.maximum(rng.standard_normal((B, D_SAE)), 0).astype(np.float32)
    for row in heavy_rows:
        r[row] = 10.0 + rng.random(D_SAE)  # all 48 > 4k = 16 of this row are among the top entries
    expected = np.sort(r.ravel())[-K * B]
    if heavy_rows:
        assert _candidate_only_threshold(r, K) < expected
    np.testing.assert_array_equal(_batch_threshold_jit(jnp.asarray(r), K), expected)


_batch_threshold_jit = jax.jit(batch_threshold, static_argnums=1)


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_batchtopk_keeps_top_k_batch_entries(name):
    """The training code keeps exactly the top k·batch entries of ReLU(z) over the whole batch, also
    when one or two tokens hold more than 4k of them (inputs scaled up); losses then match NumPy too."""
    sae, forward, _ = sae_and_fns(name)
    params = perturbed_params(sae, 2)
    p = np64(params)
    for heavy_rows in ((), (0,), (0, 1)):
        x = np.asarray(inputs(2)).copy()
        x[list(heavy_rows)] *= 50.0
        x = jnp.asarray(x)
        out = forward(params, sae.init_buffers(), x, x, dead_mask(16), jnp.float32(0))
        r = relu(np_preacts(p, np.asarray(x, np.float64), True))
        top = np.zeros(r.size, bool)
        top[np.argsort(-r.ravel())[: K * B]] = True
        f_mask = np_forward(name, sae.cfg, params, x, dead_mask(16), 0.0)["f"] > 0
        np.testing.assert_array_equal(f_mask.ravel(), top)
        np.testing.assert_allclose(out.l0, K, **TOL)
        for row in heavy_rows:
            assert top.reshape(B, D_SAE)[row].sum() > 4 * K
        check_forward(name, out, np_forward(name, sae.cfg, params, x, dead_mask(16), 0.0))


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("heavy_rows", [(), (0,), (0, 1)])
def test_batchtopk_sparse_step_equals_dense(name, heavy_rows):
    """The step's loss, terms and every gradient equal the dense path's (f = r·1[r ≥ τ] as a [batch, d_sae]
    array, decoded by matmuls): on the sparse path, with one row overflowing its candidates (taken in
    full beside the sparse rows: batch/32 = 1 such row fits) and with two (the dense path)."""
    sae, _, _ = sae_and_fns(name)
    params = perturbed_params(sae, 5)
    x = np.asarray(inputs(5)).copy()
    x[list(heavy_rows)] *= 50.0
    r = relu(np_preacts(np64(params), x.astype(np.float64), True))
    tau = np.sort(r.ravel())[-K * B]
    fourth = -np.sort(-r, axis=1)[:, 4 * K - 1]  # each row's last candidate
    assert (fourth >= tau).any() == bool(heavy_rows)  # which path the step takes
    sparse_out, dense_out, sparse_g, dense_g = _batchtopk_paths(name)(params, jnp.asarray(x), dead_mask(16))
    for term in dense_out.terms:
        np.testing.assert_allclose(sparse_out.terms[term], dense_out.terms[term], **TOL, err_msg=term)
    np.testing.assert_array_equal(sparse_out.fire_counts, dense_out.fire_counts)
    np.testing.assert_allclose(sparse_out.buffers["threshold"], dense_out.buffers["threshold"], **TOL)
    assert set(sparse_g) == set(dense_g) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for p in dense_g:
        scale = np.abs(np.asarray(dense_g[p])).max()  # a heavy row's terms dwarf the rest: rounding scales
        assert scale > 0
        np.testing.assert_allclose(sparse_g[p], dense_g[p], rtol=1e-5, atol=1e-6 * max(10.0, scale), err_msg=p)


@functools.cache
def _batchtopk_paths(name: str):
    """Jitted (forward, dense-path forward, their gradients): the dense path built from the family's parts."""
    from sae.architectures.batchtopk import topk_family_loss

    sae, _, _ = sae_and_fns(name)

    def dense(params, x, dead):
        f, xw, buffers = sae.batch_code(params, sae.init_buffers(), x)
        x_hat, terms = sae.decode_dense(params, f, x)
        counts = jnp.sum(f > 0, axis=0, dtype=jnp.int32)
        return topk_family_loss(sae, params, buffers, x, x, x_hat, xw, dead, terms, counts, jnp.sum(f > 0))

    def sparse(params, x, dead):
        return sae.forward(params, sae.init_buffers(), x, x, dead, jnp.float32(0))

    def both(params, x, dead):
        grads = [jax.grad(lambda p, fn=fn: fn(p, x, dead).loss)(params) for fn in (sparse, dense)]
        return sparse(params, x, dead), dense(params, x, dead), *grads

    return jax.jit(both)


def test_batchtopk_threshold_buffer():
    """The inference threshold: the first batch (θ < 0, unset) sets θ = smallest kept activation
    (= τ_batch); later batches update θ ← decay·θ + (1 − decay)·τ; with fewer than k·batch positive
    entries everything positive is kept and θ tracks the smallest positive one."""
    sae, forward, _ = sae_and_fns("batchtopk")
    params, x = perturbed_params(sae, 4), inputs(4)
    _, tau, _ = np_batch_code(sae.cfg, np64(params), np.asarray(x, np.float64), -1.0)
    assert tau > 0
    first = forward(params, {"threshold": jnp.float32(-1)}, x, x, dead_mask(0), jnp.float32(0))
    np.testing.assert_allclose(first.buffers["threshold"], tau, **TOL)
    later = forward(params, {"threshold": jnp.float32(0.7)}, x, x, dead_mask(0), jnp.float32(0))
    np.testing.assert_allclose(later.buffers["threshold"], DECAY * 0.7 + (1 - DECAY) * tau, **TOL)

    sparse = {**params, "b_enc": params["b_enc"] - 3.0}  # few positive pre-activations
    ref = np_forward("batchtopk", sae.cfg, sparse, x, dead_mask(0), 0.0, threshold=0.7)
    r = relu(np_preacts(np64(sparse), np.asarray(x, np.float64), True))
    assert 0 < (r > 0).sum() < K * B
    np.testing.assert_array_equal(ref["f"] > 0, r > 0)
    out = forward(sparse, {"threshold": jnp.float32(0.7)}, x, x, dead_mask(0), jnp.float32(0))
    np.testing.assert_allclose(out.buffers["threshold"], DECAY * 0.7 + (1 - DECAY) * r[r > 0].min(), **TOL)
    check_forward("batchtopk", out, ref)


# --- 3. exact_top_k -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1024, 8), (1024, 3), (48, 4), (100, 5), (256, 8)])
def test_exact_top_k_matches_lax_top_k(n, k):
    """exact_top_k returns lax.top_k's values (sorted) and the same index set per row; (1024, 8) and
    (1024, 3) take the blocked path (one row has all its top-k inside one block), the rest fall back."""
    rng = np.random.default_rng(n + k)
    z = rng.standard_normal((B, n)).astype(np.float32)
    z[0, 32 : 32 + k] = 10.0 + np.arange(k)  # all of row 0's top-k in a single block
    z[1] = -np.abs(z[1])  # all negative
    vals, idx = jax.jit(exact_top_k, static_argnums=1)(jnp.asarray(z), k)
    ref_vals, ref_idx = jax.lax.top_k(jnp.asarray(z), k)
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(vals, -np.sort(-z, axis=1)[:, :k])
    np.testing.assert_array_equal(np.take_along_axis(z, np.asarray(idx), 1), vals)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(ref_idx, axis=1))


# --- 4. sparse custom-VJP ops and the TopK backward --------------------------------------------------


def _one_hot(idx, n):
    return jax.nn.one_hot(idx, n, dtype=jnp.float32)  # [batch, k, n]


def test_take_with_sparse_grad_and_gather_sum_values_and_grads():
    """take_with_sparse_grad / gather_sum and their gradients equal dense one-hot einsums (indices
    repeat within and across rows, so the scatters must accumulate); the former sends no gradient to
    the precomputed xw."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((B, D_IN)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D_SAE, D_IN)), jnp.float32)
    vals = jnp.asarray(rng.standard_normal((B, K)), jnp.float32)
    idx = rng.integers(0, D_SAE, (B, K))
    idx[0, 1] = idx[0, 0]
    idx = jnp.asarray(idx, jnp.int32)
    oh = _one_hot(idx, D_SAE)
    g_dot = jnp.asarray(rng.standard_normal((B, K)), jnp.float32)
    g_sum = jnp.asarray(rng.standard_normal((B, D_IN)), jnp.float32)

    def dense_dot(w):
        return jnp.einsum("bd,bjn,nd->bj", x, oh, w)

    def dense_sum(v, w):
        return jnp.einsum("bj,bjn,nd->bd", v, oh, w)

    def sparse_dot(w):
        return take_with_sparse_grad(jax.lax.stop_gradient(x @ w.T), x, w.T, idx)

    np.testing.assert_allclose(sparse_dot(w), dense_dot(w), **TOL)
    np.testing.assert_allclose(gather_sum(vals, w, idx), dense_sum(vals, w), **TOL)
    np.testing.assert_allclose(
        sparse_dot(w), np.einsum("bd,bjd->bj", np.asarray(x), np.asarray(w)[np.asarray(idx)]), **TOL
    )

    grads = jax.jit(
        lambda w, v: (
            jax.grad(lambda w: jnp.sum(g_dot * sparse_dot(w)))(w),
            jax.grad(lambda w: jnp.sum(g_dot * dense_dot(w)))(w),
            jax.grad(lambda v, w: jnp.sum(g_sum * gather_sum(v, w, idx)), argnums=(0, 1))(v, w),
            jax.grad(lambda v, w: jnp.sum(g_sum * dense_sum(v, w)), argnums=(0, 1))(v, w),
        )
    )(w, vals)
    sw, dw, (sv, sw2), (dv, dw2) = grads
    for a, b in ((sw, dw), (sv, dv), (sw2, dw2)):
        assert np.abs(np.asarray(b)).max() > 0
        np.testing.assert_allclose(a, b, **TOL)
    xw = x @ w.T
    g_xw = jax.grad(lambda xw: jnp.sum(g_dot * take_with_sparse_grad(xw, x, w.T, idx)))(xw)
    assert not np.any(np.asarray(g_xw))


def dense_topk_loss(params, x, topk_mask, aux_mask, alpha):
    """TopK + AuxK written densely with jnp; the (stop-gradient) selections come in as masks."""
    z = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    r = jax.nn.relu(z)
    x_hat = (r * topk_mask) @ params["W_dec"] + params["b_dec"]
    mse = jnp.mean(jnp.sum((x - x_hat) ** 2, -1))
    e = jax.lax.stop_gradient(x - x_hat)
    variance = lambda a: jnp.mean(jnp.sum((a - a.mean(0)) ** 2, -1))
    aux = jnp.mean(jnp.sum((e - (r * aux_mask) @ params["W_dec"]) ** 2, -1)) * variance(x) / variance(e)
    return mse + alpha * aux


@pytest.mark.parametrize("n_dead", [0, 16])
def test_topk_gradients_match_dense_reference(n_dead):
    """∂loss/∂(W_enc, b_enc, W_dec, b_dec) of TopK's sparse forward (take_with_sparse_grad / gather_sum custom
    VJPs, AuxK included when latents are dead) equal those of a dense jnp implementation."""
    sae, _, _ = sae_and_fns("topk")
    params, x, dead = perturbed_params(sae, 11 + n_dead), inputs(11), dead_mask(n_dead)
    z = np_preacts(np64(params), np.asarray(x, np.float64), True)
    topk_mask = np_topk_rows(relu(z) + 1.0, K) > 0  # +1 so rows with < k positives still pick k
    aux_mask = np_auxk_mask(z, np.asarray(dead), K_AUX)
    sparse_g, dense_g = _topk_grads()(
        params, x, dead, jnp.asarray(topk_mask, jnp.float32), jnp.asarray(aux_mask, jnp.float32)
    )
    assert set(sparse_g) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in sparse_g:
        assert np.abs(np.asarray(dense_g[name])).max() > 0
        np.testing.assert_allclose(sparse_g[name], dense_g[name], **TOL, err_msg=name)


@functools.cache
def _topk_grads():
    """Jitted (sparse TopK forward grads, dense reference grads); compiled once."""
    sae, _, _ = sae_and_fns("topk")

    def both(params, x, dead, topk_mask, aux_mask):
        sparse = jax.grad(lambda p: sae.forward(p, {}, x, x, dead, jnp.float32(0)).loss)(params)
        dense = jax.grad(dense_topk_loss)(params, x, topk_mask, aux_mask, sae.cfg.aux_coefficient)
        return sparse, dense

    return jax.jit(both)


# --- 5. JumpReLU pseudo-gradients -------------------------------------------------------------------


def test_jumprelu_and_step_pseudo_gradients():
    """jumprelu = z·H(z − θ) and step = H(z − θ); their VJPs: ∂/∂θ = Σ_batch g·(−θ/ε)K((z − θ)/ε)
    and Σ_batch g·(−1/ε)K((z − θ)/ε) (K = 1{|u| < ½}); ∂jumprelu/∂z = g·H(z − θ); ∂step/∂z = 0."""
    rng = np.random.default_rng(6)
    eps = BANDWIDTH
    theta = rng.uniform(0.1, 0.8, D_SAE).astype(np.float32)
    z = theta + rng.uniform(-1.0, 1.0, (B, D_SAE)).astype(np.float32) * np.where(
        rng.random((B, D_SAE)) < 0.5, eps, 1.0
    ).astype(np.float32)
    g = rng.standard_normal((B, D_SAE)).astype(np.float32)
    kernel = (np.abs((z - theta) / eps) < 0.5).astype(np.float64)
    assert 50 < kernel.sum() < kernel.size - 50
    H = (z > theta).astype(np.float64)

    def vjps(z, theta, g):
        _, jr = jax.vjp(lambda a, t: jumprelu(a, t, eps), z, theta)
        _, st = jax.vjp(lambda a, t: step(a, t, eps), z, theta)
        return jumprelu(z, theta, eps), step(z, theta, eps), jr(g), st(g)

    f, h, (jz, jt), (sz, stt) = jax.jit(vjps)(jnp.asarray(z), jnp.asarray(theta), jnp.asarray(g))
    np.testing.assert_allclose(f, z * H, **TOL)
    np.testing.assert_array_equal(h, H)
    np.testing.assert_allclose(jz, g * H, **TOL)
    np.testing.assert_allclose(jt, np.sum(g * -(theta / eps) * kernel, axis=0), **TOL)
    np.testing.assert_array_equal(sz, np.zeros_like(z))
    np.testing.assert_allclose(stt, np.sum(g * -(1 / eps) * kernel, axis=0), **TOL)


def test_jumprelu_forward_threshold_gradient():
    """∂loss/∂θ of the JumpReLU forward = Σ_b (∂mse/∂f)·(−θ/ε)K + (λ/batch) Σ_b (−1/ε)K, and the
    encoder gradient sees only the reconstruction (the L0 term sends nothing to z)."""
    sae, _, _ = sae_and_fns("jumprelu")
    params, x = perturbed_params(sae, 8), inputs(8)
    p, xn = np64(params), np.asarray(x, np.float64)
    z = np_preacts(p, xn, False)
    theta = np.maximum(z[0], 0.05) + 0.03  # row 0 sits inside the bandwidth of every latent
    params = {**params, "threshold": jnp.asarray(theta, jnp.float32)}
    p["threshold"] = np.asarray(params["threshold"], np.float64)
    theta = p["threshold"]
    kernel = (np.abs((z - theta) / BANDWIDTH) < 0.5).astype(np.float64)
    H = (z > theta).astype(np.float64)
    assert kernel.sum() >= D_SAE
    x_hat = (z * H) @ p["W_dec"] + p["b_dec"]
    d_f = 2.0 / B * (x_hat - xn) @ p["W_dec"].T  # ∂mse/∂f
    expected_theta = np.sum(d_f * -(theta / BANDWIDTH) * kernel, 0) + LAM / B * np.sum(-(1 / BANDWIDTH) * kernel, 0)
    expected_b_enc = np.sum(d_f * H, 0)
    grads = jax.jit(jax.grad(lambda q: sae.forward(q, {}, x, x, dead_mask(0), jnp.float32(LAM)).loss))(params)
    np.testing.assert_allclose(grads["threshold"], expected_theta, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grads["b_enc"], expected_b_enc, **TOL)
    np.testing.assert_allclose(grads["W_enc"], xn.T @ (d_f * H), **TOL)


# --- 6. Gated stop-gradients -----------------------------------------------------------------------


def test_gated_aux_and_l1_gradients():
    """The gate auxiliary term ‖x − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖² sends no gradient to W_dec
    or the magnitude path, none to b_dec as a decoder bias (only via the encoder's pre-bias), and its
    gradients to W_gate, b_gate, b_dec match NumPy; the L1 term is
    Σ ReLU(π_gate) (∂/∂b_gate = mean_b 1[π_gate > 0]), not ‖f‖₁."""
    sae, _, _ = sae_and_fns("gated")
    params, x = perturbed_params(sae, 9), inputs(9)
    p, xn = np64(params), np.asarray(x, np.float64)

    def term(q, name):
        return sae.forward(q, {}, x, x, dead_mask(0), jnp.float32(LAM)).terms[name]

    g_aux, g_l1 = jax.jit(lambda q: (jax.grad(term)(q, "gate_aux_loss"), jax.grad(term)(q, "l1_loss")))(params)
    pi_gate, pi_mag = np_gated_parts(p, xn)
    gate, on = relu(pi_gate), (pi_gate > 0).astype(np.float64)
    for name in ("W_dec", "r_mag", "b_mag"):
        np.testing.assert_array_equal(g_aux[name], 0.0, err_msg=name)
        np.testing.assert_array_equal(g_l1[name], 0.0, err_msg=name)
    d_gate = 2.0 / B * (gate @ p["W_dec"] + p["b_dec"] - xn) @ p["W_dec"].T * on  # ∂aux/∂π_gate
    np.testing.assert_allclose(g_aux["b_gate"], d_gate.sum(0), **TOL)
    np.testing.assert_allclose(g_aux["W_enc"], (xn - p["b_dec"]).T @ d_gate, **TOL)
    # b_dec is reached only through the encoder's pre-bias (x − b_dec) in π_gate, which the reference
    # does not stop; the decoder-side sg(b_dec) contributes nothing (that part would be −2(x − x̂_gate)).
    np.testing.assert_allclose(g_aux["b_dec"], -d_gate.sum(0) @ p["W_enc"].T, **TOL)
    np.testing.assert_allclose(g_l1["b_gate"], on.mean(0), **TOL)
    np.testing.assert_allclose(g_l1["W_enc"], (xn - p["b_dec"]).T @ on / B, **TOL)
    np.testing.assert_allclose(g_l1["b_dec"], -on.mean(0) @ p["W_enc"].T, **TOL)
    f = (pi_gate > 0) * relu(pi_mag)
    assert abs(np.mean(gate.sum(-1)) - np.mean(f.sum(-1))) > 1e-2  # the two candidates differ


# --- 7. unit-norm decoder constraint -------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_project_grads_and_post_update(name):
    """Unit-norm families: project_grads gives g − (g·ŵ)ŵ per decoder row (orthogonal to the row),
    other grads untouched; post_update sets rows to w/‖w‖ (and clips JumpReLU's θ at 0).
    relu_april has no constraint: both are the identity."""
    sae, _, _ = sae_and_fns(name)
    params = perturbed_params(sae, 10)
    rng = np.random.default_rng(10)
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    if "threshold" in params:
        params = {**params, "threshold": params["threshold"].at[::3].set(-0.2)}
    projected = sae.project_grads(params, grads)
    updated = sae.post_update(params)
    w, g = np.asarray(params["W_dec"], np.float64), np.asarray(grads["W_dec"], np.float64)
    if name not in UNIT_NORM:
        for k in params:
            np.testing.assert_array_equal(projected[k], grads[k])
            np.testing.assert_array_equal(updated[k], params[k])
        return
    w_hat = w / np.linalg.norm(w, axis=-1, keepdims=True)
    expected = g - np.sum(g * w_hat, -1, keepdims=True) * w_hat
    np.testing.assert_allclose(projected["W_dec"], expected, **TOL)
    np.testing.assert_allclose(np.sum(np.asarray(projected["W_dec"]) * w, -1), 0.0, atol=1e-5)
    np.testing.assert_allclose(updated["W_dec"], w_hat, **TOL)
    for k in params:
        if k != "W_dec":
            np.testing.assert_array_equal(projected[k], grads[k])
        if k not in ("W_dec", "threshold"):
            np.testing.assert_array_equal(updated[k], params[k])
    if "threshold" in params:
        np.testing.assert_array_equal(updated["threshold"], np.maximum(np.asarray(params["threshold"]), 0.0))


# --- 8. Matryoshka prefixes -------------------------------------------------------------------------


def test_prefix_sizes():
    """Explicit prefixes end at d_sae (d_sae appended once); the default is d_sae/16, /8, /4, /2, d_sae."""
    assert prefix_sizes([8, 24], D_SAE) == (8, 24, 48)
    assert prefix_sizes([8, 48], D_SAE) == (8, 48)
    assert prefix_sizes([], D_SAE) == (3, 6, 12, 24, 48)


def test_matryoshka_explicit_prefixes_match_numpy(prefixes=(8, 24)):
    """Matryoshka loss = Σ_m ‖x − (f_{:m} W_dec,{:m} + b_dec)‖² + α AuxK for explicit prefixes [8, 24]
    with d_sae 48 (prefix_loss = the sum over m < d_sae, mse_loss = the full dictionary), vs NumPy.
    The default prefixes (3, 6, 12, 24) are covered by test_forward_matches_numpy[matryoshka]."""
    sae, forward, _ = sae_and_fns("matryoshka", prefixes)
    params, x, dead = perturbed_params(sae, 12), inputs(12), dead_mask(16)
    out = forward(params, sae.init_buffers(), x, x, dead, jnp.float32(0))
    ref = np_forward("matryoshka", sae.cfg, params, x, dead, 0.0)
    check_forward("matryoshka", out, ref)
    p, f = np64(params), ref["f"]
    xn = np.asarray(x, np.float64)
    by_hand = sum(np_sqerr(xn, f[:, :m] @ p["W_dec"][:m] + p["b_dec"]) for m in prefixes)
    np.testing.assert_allclose(out.terms["prefix_loss"], by_hand, **TOL)


@pytest.mark.parametrize("shards, k", [(4, 5), (8, 40), (2, 1)])
def test_latent_sharded_top_k_is_exact(shards, k):
    """Local top-k per contiguous shard, then a global top-k over the candidates, equals lax.top_k."""
    z = jax.random.normal(jax.random.PRNGKey(3), (16, 64))
    with latent_sharded_top_k(shards):
        values, idx = exact_top_k(z, k)
    want_values, want_idx = jax.lax.top_k(z, k)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(idx, want_idx)


def test_every_family_has_a_test_entry():
    per_layer = {name: family for name, family in REGISTERED.items() if not family.cross_layer}  # clt: test_clt.py
    assert sorted(FAMILY_TESTS) == list(per_layer)
    for name, family in per_layer.items():
        assert (family.saelens, family.pre_bias) == FAMILY_TESTS[name].saelens, name


# --- entry checks: any leading dims; another width or dtype is one line naming d_in / d_sae -------------


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_decode_take_any_leading_dims_and_name_the_expected_width(name):
    sae, _, encode = sae_and_fns(name)
    params, x = perturbed_params(sae), inputs()
    buffers = sae.init_buffers()
    f = sae.encode(params, x, buffers)
    np.testing.assert_allclose(sae.encode(params, x[3], buffers), f[3], **TOL)  # a single vector [d_in]
    np.testing.assert_allclose(sae.encode(params, x.reshape(4, 8, D_IN), buffers), f.reshape(4, 8, D_SAE), **TOL)
    np.testing.assert_allclose(sae(params, x[3], buffers), sae.decode(params, f[3]), **TOL)
    for bad in (x[:, :5], x[0, :5], x[0, 0], x[None, :, :5]):
        expected = f"encode: x has shape {tuple(bad.shape)}; expected (..., d_in={D_IN})"
        with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
            sae.encode(params, bad, buffers)
    with pytest.raises(DataError, match=re.escape(f"encode: x has shape (32, 5); expected (..., d_in={D_IN})")):
        encode(params, x[:, :5], buffers)  # under jax.jit: the check runs at trace time
    with pytest.raises(
        DataError, match=re.escape(f"encode: x has dtype int32; expected floating point (..., d_in={D_IN})")
    ):
        sae.encode(params, x.astype(jnp.int32), buffers)
    with pytest.raises(DataError, match=re.escape(f"decode: f has shape (32, 5); expected (..., d_sae={D_SAE})")):
        sae.decode(params, f[:, :5])


# the encoder-bias shifts giving paths 0, 1, 2 (capacity 64, 256, dense) on inputs(7) · 2
SHIFTS = {
    "relu": (6.0, 3.0, 0.0),
    "relu_april": (4.0, 2.0, -3.0),
    "jumprelu": (5.0, 2.0, -1.0),
    "gated": (6.0, 3.0, 0.0),
}


@pytest.mark.parametrize("name", ["relu", "relu_april", "jumprelu", "gated"])
@pytest.mark.parametrize("want", [0, 1, 2])
def test_capacity_paths_equal_dense(name, want):
    """ReLU, JumpReLU and Gated codes step sparsely once they are sparse: with the encoder bias shifted so that
    the widest row holds under 64, under 256 or over 256 of 512 slots (ReLU: active latents; JumpReLU:
    z > θ − ε/2, active or in the window where θ's pseudo-gradient reaches; Gated: open gates), the route
    picks capacity 64, 256 or the dense path, and each path that can hold the code gives the dense path's
    loss, terms and every gradient (θ's, r_mag's and the gate's too)."""
    sae = make_sae(dataclasses.replace(make_cfg(name), d_sae=512), D_IN)
    params = perturbed_params(sae, 7)
    bias = "b_gate" if name == "gated" else "b_enc"  # SHIFTS[name][i]: the shift giving path i
    params = {**params, bias: params[bias] - SHIFTS[name][want]}
    x = inputs(7) * 2.0
    if name == "gated":
        z = np_gated_parts(np64(params), np.asarray(x, np.float64))[0]
    else:
        z = np_preacts(np64(params), np.asarray(x, np.float64), sae.applies_pre_bias)
    floor = np.asarray(params["threshold"]) - BANDWIDTH / 2 if name == "jumprelu" else 0.0
    widest = (z > floor).sum(1).max()
    assert (0 if widest < 64 else 1 if widest < 256 else 2) == want
    path, outs, grads = _capacity_paths(name)(params, x)
    assert int(path) == want
    dense, dense_g = outs[-1], grads[-1]
    for out, g in zip(outs[want:], grads[want:]):  # every path from the chosen one on holds the code
        for term in dense.terms:
            np.testing.assert_allclose(out.terms[term], dense.terms[term], **TOL, err_msg=term)
        np.testing.assert_allclose(out.x_hat, dense.x_hat, **TOL)
        np.testing.assert_allclose(out.l0, dense.l0, **TOL)
        np.testing.assert_array_equal(out.fire_counts, dense.fire_counts)
        for p in dense_g:
            np.testing.assert_allclose(g[p], dense_g[p], **TOL, err_msg=p)


@functools.cache
def _capacity_paths(name: str):
    """Jitted (the chosen path, every path's forward from the chosen one on, their gradients)."""
    sae = make_sae(dataclasses.replace(make_cfg(name), d_sae=512), D_IN)

    def run(params, x):
        path, plan = sae.route(params, {}, x)
        outs, grads = [], []
        for i in range(sae.paths):
            fn = lambda p, i=i: sae.forward(p, {}, x, x, jnp.zeros(512, bool), jnp.float32(LAM), route=(i, plan))
            outs.append(fn(params))
            grads.append(jax.grad(lambda p, fn=fn: fn(p).loss)(params))
        return path, outs, grads

    return jax.jit(run)
