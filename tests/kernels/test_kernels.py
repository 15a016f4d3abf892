"""The CPU kernels (sae/kernels) against NumPy and lax.top_k, and the TopK step with them against the
step on XLA's own ops (the path GPUs, TPUs and sharded steps take)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import kernels
from sae.architectures import make_sae
from sae.architectures.batchtopk import BatchTopKConfig
from sae.architectures.sparse import _gather_sum_bwd, _scatter_columns, gather_sum, top_k_of
from sae.architectures.topk import TopKConfig
from sae.config import OptimConfig
from sae.training.step import init_state, make_optimizer, make_train_step

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler: the XLA ops run instead")

TOL = dict(rtol=1e-5, atol=1e-5)


def rows_with_ties(rng, batch, n):
    """Normal rows, plus rows of ReLU ties (fewer than k positive), repeated values and −∞."""
    z = rng.standard_normal((batch, n)).astype(np.float32)
    z[0] = -1.0  # ReLU: all zero, ties everywhere
    z[1, ::7] = 0.5  # many equal values
    z[2] = -np.abs(z[2])
    z[2, [3, n - 1]] = 1.0  # two positive entries
    z[3] = np.round(z[3])  # integers: heavy ties
    return z


@pytest.mark.parametrize("n,k", [(1024, 8), (1024, 32), (256, 100), (100, 7), (48, 48), (8192, 256), (512, 256)])
@pytest.mark.parametrize("relu", [True, False])
def test_top_k_equals_lax_top_k(n, k, relu):
    """Values and indices exactly equal lax.top_k's (ties to the lower index), for the blocked path
    (n/groups ≥ 2k) and the one-block fallback, with a −∞-masked bias (AuxK's dead-latent selection); (512, 256)
    has rows with more than 128 but fewer than k entries above the block threshold."""
    rng = np.random.default_rng(n + k)
    z = rows_with_ties(rng, 16, n)
    bias = rng.standard_normal(n).astype(np.float32) * 0.1
    bias[rng.random(n) < 0.5] = -np.inf
    bias[:4] = 0.0
    fn = jax.jit(lambda z, b: top_k_of(z, b, k, relu))
    with kernels.use(False):
        fallback = jax.jit(lambda z, b: top_k_of(z, b, k, relu))
    for b in (np.zeros(n, np.float32), bias):
        a = jnp.asarray(z) + b
        want_values, want_idx = jax.lax.top_k(jax.nn.relu(a) if relu else a, k)
        values, idx = fn(z, b)
        np.testing.assert_array_equal(values, want_values)
        np.testing.assert_array_equal(idx, want_idx)
        fallback_values, _ = fallback(z, b)
        np.testing.assert_array_equal(fallback_values, want_values)


def test_top_k_all_masked_rows():
    """A bias of −∞ everywhere (no dead latent): −∞ values at indices 0..k−1, like lax.top_k."""
    z = jnp.asarray(np.random.default_rng(0).standard_normal((8, 512)), jnp.float32)
    values, idx = jax.jit(lambda z, b: top_k_of(z, b, 16, relu=False))(z, jnp.full((512,), -jnp.inf))
    assert np.all(np.isneginf(values))
    np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(16), (8, 16)))


def sparse_case(seed=0, batch=64, n=96, d=40, k=6):
    rng = np.random.default_rng(seed)
    vals = rng.standard_normal((batch, k)).astype(np.float32)
    idx = rng.integers(0, n, (batch, k)).astype(np.int32)
    idx[0, 1] = idx[0, 0]  # a repeat within a row: contributions must add
    idx[:, 2] = 5  # one latent used by every row
    w = rng.standard_normal((n, d)).astype(np.float32)
    rows = rng.standard_normal((batch, d)).astype(np.float32)
    return vals, idx, w, rows


def test_gather_and_scatter_kernels_equal_numpy():
    """gather_sum, its fused backward and the encoder's column scatter against NumPy loops."""
    vals, idx, w, rows = sparse_case()
    batch, k = idx.shape
    want_sum = np.einsum("bj,bjd->bd", vals, w[idx])
    want_grad_vals = np.einsum("bd,bjd->bj", rows, w[idx])
    want_grad_w = np.zeros_like(w)
    want_columns = np.zeros(w.shape[::-1], np.float32)
    for b in range(batch):
        for j in range(k):
            want_grad_w[idx[b, j]] += vals[b, j] * rows[b]
            want_columns[:, idx[b, j]] += vals[b, j] * rows[b]
    out_sum = jax.jit(gather_sum)(vals, w, idx)
    grad_vals, grad_w, _ = jax.jit(lambda v, w, i, g: _gather_sum_bwd((v, w, i), g))(vals, w, idx, rows)
    columns = jax.jit(lambda v, r, i: _scatter_columns(v, r, i, w.shape[0]))(vals, rows, idx)
    np.testing.assert_allclose(out_sum, want_sum, **TOL)
    np.testing.assert_allclose(grad_vals, want_grad_vals, **TOL)
    np.testing.assert_allclose(grad_w, want_grad_w, **TOL)
    np.testing.assert_allclose(columns, want_columns, **TOL)
    assert (
        "sae_scatter_columns" in jax.jit(lambda v, r, i: _scatter_columns(v, r, i, 96)).lower(vals, rows, idx).as_text()
    )


def train(cfg, d_in, steps, x, use_kernels):
    """Parameters and L0s after `steps` steps on x: [steps, batch, d_in], some latents dead from step 3."""
    sae = make_sae(cfg, d_in)
    tx, schedule = make_optimizer(OptimConfig(), 3e-3, steps)
    state = init_state(sae, sae.init_params(jax.random.PRNGKey(1), jnp.asarray(x[0].mean(0))), tx, 1.0)
    with kernels.use(use_kernels):
        step = make_train_step(sae, tx, schedule, steps, 0.0, dead_tokens=2 * x.shape[1])
        l0s = []
        for batch in x:
            state, metrics = step(state, jnp.asarray(batch))
            l0s.append(float(metrics["l0"]))
    return jax.device_get(state.params), l0s, step


@pytest.mark.parametrize(
    "cfg", [TopKConfig(d_sae=256, k=8, k_aux=16), BatchTopKConfig(d_sae=256, k=8)], ids=["topk", "batchtopk"]
)
def test_train_step_with_kernels_equals_xla_ops(cfg):
    """Eight Adam steps with the kernels and with XLA's ops: the same L0 at each step and the same
    parameters to float32 round-off (sums run in another order). The data lives in a 32-dim
    subspace of 64, so latents die and AuxK runs in the later steps."""
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, 64)).astype(np.float32)
    x = rng.standard_normal((8, 512, 32)).astype(np.float32) @ basis
    with_kernels, l0_k, step = train(cfg, 64, 8, x, use_kernels=True)
    with_xla, l0_x, xla_step = train(cfg, 64, 8, x, use_kernels=False)
    assert "sae_top_k" in step.lower(*step_args(cfg, x)).as_text()
    assert "sae_top_k" not in xla_step.lower(*step_args(cfg, x)).as_text()
    assert l0_k == l0_x
    for name in with_kernels:
        scale = np.abs(with_xla[name]).max()
        np.testing.assert_allclose(with_kernels[name], with_xla[name], atol=1e-5 * scale, err_msg=name)


def step_args(cfg, x):
    sae = make_sae(cfg, x.shape[-1])
    tx, _ = make_optimizer(OptimConfig(), 3e-3, 8)
    state = init_state(sae, sae.init_params(jax.random.PRNGKey(1), jnp.zeros(x.shape[-1])), tx, 1.0)
    return state, jnp.asarray(x[0])


def test_without_compiler_falls_back_with_a_warning(tmp_path):
    """No C++ compiler and an empty cache: one warning naming why, and the XLA ops give the result."""
    code = (
        "import warnings, jax, jax.numpy as jnp\n"
        "from sae.architectures.sparse import top_k_of\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    v, i = jax.jit(lambda z: top_k_of(z, jnp.zeros(64), 3))(jnp.arange(128.).reshape(2, 64))\n"
        "print([str(x.message) for x in w if 'sae.kernels' in str(x.message)], i.tolist())\n"
    )
    env = {
        "SAE_JAX_CACHE": str(tmp_path),
        "CXX": str(tmp_path / "no-such-compiler"),
        "PATH": "/usr/bin:/bin",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CPU kernels unavailable" in out.stdout and "no-such-compiler" in out.stdout
    assert "[[63, 62, 61], [63, 62, 61]]" in out.stdout


@pytest.mark.slow
def test_portable_top_k_equals_lax_top_k(tmp_path):
    """The kernels built without AVX-512 (their portable loops) give lax.top_k's values and indices."""
    code = (
        "import sys, jax, jax.numpy as jnp, numpy as np\n"
        "sys.path.insert(0, 'tests/kernels')\n"
        "from test_kernels import rows_with_ties\n"
        "from sae import kernels\n"
        "from sae.architectures.sparse import top_k_of\n"
        "assert kernels.available()\n"
        "for n, k, relu in [(1024, 8, True), (256, 100, False), (100, 7, True), (8192, 40, False)]:\n"
        "    z = rows_with_ties(np.random.default_rng(n), 16, n)\n"
        "    b = np.where(np.arange(n) % 3 == 0, -np.inf, 0.0).astype(np.float32)\n"
        "    a = jnp.asarray(z) + b\n"
        "    want = jax.lax.top_k(jax.nn.relu(a) if relu else a, k)\n"
        "    got = jax.jit(lambda z, b: top_k_of(z, b, k, relu))(z, b)\n"
        "    np.testing.assert_array_equal(got[0], want[0])\n"
        "    np.testing.assert_array_equal(got[1], want[1])\n"
        "print('equal')\n"
    )
    env = {**os.environ, "SAE_JAX_CACHE": str(tmp_path), "SAE_JAX_CXXFLAGS": "-mno-avx512f", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "equal" in out.stdout
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1  # built here, with the flag
