"""Every family's sparse train step equals its dense one: loss, every logged term, L0 and fire counts at each
step, and after it Adam's moments (the gradients) and the params, on random and trained parameters, on one
device and the 8-fake-device meshes, in sweeps, and with the portable (non-AVX-512) CPU kernels.

The dense step is the family's last path, forced by patching `route` to return it with the real plan (the dense
paths read only the plan's x W_enc); TopK has no dense path, so its reference is a dense jnp forward written
here. Every run asserts the path it took on every step. Measured after 3 Adam steps at lr 1e-2 (no clipping):
params ≤ 7e-6 of the dense run's max |param| (ReLU April; the others ≤ 1.3e-6), moments ≤ 8e-7, every logged
metric ≤ 4e-7, L0 and fire counts identical; `TOL` allows about 5× that.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae.architectures import FAMILIES, make_sae
from sae.architectures.base import Forward, encoder_bias, squared_error, total_variance
from sae.architectures.batchtopk import SPARSE, SPARSE_AND_ROWS
from sae.architectures.capacity import CapacityRoute
from sae.architectures.topk import TopK
from sae.config import MeshConfig, OptimConfig
from sae.training.step import init_state, make_optimizer, make_sweep_step, make_train_step, pure_train_step

ROOT = Path(__file__).resolve().parents[2]
D_IN, D_SAE, BATCH, STEPS = 16, 512, 64, 3
CAPACITY = ("relu", "relu_april", "jumprelu", "gated")
NAMES = (*CAPACITY, "batchtopk", "matryoshka", "topk")
FIELDS = {"batchtopk": {"k": 4}, "matryoshka": {"k": 4}, "topk": {"k": 4}}
OPTIM = OptimConfig(warmup_fraction=0.0, decay_fraction=0.0, grad_clip=None)  # Adam's moments: the raw grads
N_STEPS = 1000  # the schedules' length: a constant lr over the few steps run
TOL = {"params": 3e-5, "moments": 1e-5, "buffers": 1e-5, "metrics": 1e-5}  # relative to the dense run's max |value|


def make(name: str, **fields):
    return make_sae(FAMILIES[name].config(d_sae=D_SAE, **{**FIELDS.get(name, {}), **fields}), D_IN)


def random_params(sae, seed: int) -> dict[str, np.ndarray]:
    """The family's init with every array perturbed (biases non-zero, W_enc ≠ W_decᵀ, thresholds spread)."""
    key = jax.random.key(seed)
    params = jax.device_get(sae.init_params(key, jax.random.normal(key, (D_IN,))))
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in params.items():
        new = rng.uniform(0.05, 0.6, v.shape) if name == "threshold" else v + 0.3 * rng.standard_normal(v.shape)
        out[name] = np.asarray(new, np.float32)
    return out


def slots(sae, params, x) -> np.ndarray:
    """[batch, d_sae] the slot pre-activations of a capacity family (a slot where > 0)."""
    p = {k: jnp.asarray(v) for k, v in params.items()}
    return np.asarray(jnp.asarray(x) @ p["W_enc"] + sae.slot_bias(p))


def sparse_setup(sae, params, seed: int, steps: int = STEPS, widths=(24, 150)):
    """(params, batches [steps, BATCH, D_IN], the path each step should take). Capacity families: the slot bias
    shifted so the widest row of batch 0 holds widths[0] slots (path 0: capacity 64), every second batch scaled
    until a row holds ≥ widths[1] (path 1: capacity 256). BatchTopK/Matryoshka: rows of equal norm (SPARSE),
    every second batch with one row ×50 (SPARSE_AND_ROWS). TopK: one path (−1: no route)."""
    rng = np.random.default_rng(100 + seed)
    xs = (rng.standard_normal((steps, BATCH, D_IN)) + 0.2).astype(np.float32)
    params = dict(params)
    if isinstance(sae, CapacityRoute):
        top = -np.sort(-slots(sae, params, xs[0]), axis=-1)
        shift = np.max((top[:, widths[0] - 1] + top[:, widths[0]]) / 2)  # midway: no entry on a window's edge
        bias = "b_gate" if sae.name == "gated" else "b_enc"
        params[bias] = params[bias] - shift
        for x in xs[1::2]:
            x *= next(c for c in np.geomspace(1, 30, 120) if (slots(sae, params, x * c) > 0).sum(-1).max() >= widths[1])
        return params, xs, [i % 2 for i in range(steps)]
    if sae.name in ("batchtopk", "matryoshka"):
        xs *= np.sqrt(D_IN) / np.linalg.norm(xs, axis=-1, keepdims=True)
        xs[1::2, 0] *= 50.0
        return params, xs, [SPARSE if i % 2 == 0 else SPARSE_AND_ROWS for i in range(steps)]
    return params, xs, [-1] * steps


def dense_topk_forward(self, params, buffers, x, y, dead, sparsity_coefficient):
    """TopK + AuxK written densely with jnp (masks from lax.top_k): the reference for TopK's sparse forward.
    A sweep's own k (buffers["k"]) keeps its first k of the cfg.k largest."""
    z = x @ params["W_enc"] + encoder_bias(params, self.applies_pre_bias)
    r = jax.nn.relu(z)
    rows, k = jnp.arange(x.shape[0])[:, None], self.cfg.k
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(r), k)
    own = jnp.broadcast_to((jnp.arange(k) < buffers.get("k", k)).astype(r.dtype), idx.shape)
    f = r * jnp.zeros_like(r).at[rows, idx].set(own)
    x_hat = f @ params["W_dec"] + params["b_dec"]
    mse = squared_error(y, x_hat)
    _, aux_idx = jax.lax.top_k(jax.lax.stop_gradient(jnp.where(dead, z, -jnp.inf)), self.cfg.k_aux or self.d_out // 2)
    aux_mask = jnp.zeros_like(r).at[rows, aux_idx].set(1.0) * dead
    e = jax.lax.stop_gradient(y - x_hat)
    var_e, var_y = total_variance(e), jax.lax.stop_gradient(total_variance(y))
    scale = jnp.where(var_e > 0, var_y / jnp.where(var_e > 0, var_e, 1.0), 0.0)
    aux = jnp.where(jnp.any(dead), squared_error(e, (r * aux_mask) @ params["W_dec"]) * scale, 0.0)
    return Forward(
        loss=mse + self.cfg.aux_coefficient * aux,
        x_hat=x_hat,
        fire_counts=jnp.sum(f > 0, axis=0, dtype=jnp.int32),
        l0=jnp.mean(jnp.sum(f > 0, axis=-1)),
        terms={"mse_loss": mse, "auxk_loss": aux},
        buffers=buffers,
    )


@contextlib.contextmanager
def forced_dense(sae):
    """Trace the family's step on its dense path: `route` returns the last path with the real plan (TopK: the
    dense forward above)."""
    cls = type(sae)
    if cls.paths == 1:
        assert isinstance(sae, TopK), cls
        with mock.patch.object(cls, "forward", dense_topk_forward):
            yield
        return
    real = cls.route
    dense = lambda self, params, buffers, x: (jnp.int32(self.paths - 1), real(self, params, buffers, x)[1])
    with mock.patch.object(cls, "route", dense):
        yield


def traced(fn, sae, dense: bool):
    """fn, traced (on its first call) on the dense path where `dense`."""

    def call(*args):
        with forced_dense(sae) if dense else contextlib.nullcontext():
            return fn(*args)

    return call


def initial_state(sae, params):
    """The TrainState of host params, on the host."""
    tx, _ = make_optimizer(OPTIM, 1e-2, N_STEPS)
    return jax.device_get(init_state(sae, {k: jnp.asarray(v) for k, v in params.items()}, tx, 1.0))


def on_devices(host_state, mesh_shape=None):
    """(the state as fresh arrays, which the step donates; the step's shardings, None for one device). Fresh
    arrays are strongly typed: BatchTopK's initial threshold is weakly typed and would compile the step twice."""
    from sae.parallel import batch_sharding, make_mesh, replicated, state_shardings

    state = jax.tree.map(jnp.array, host_state)
    if mesh_shape is None:
        return state, None
    mesh = make_mesh(MeshConfig(*mesh_shape))
    sh = state_shardings(state, D_SAE, mesh)
    return jax.device_put(state, sh), (sh, batch_sharding(mesh), replicated(mesh))


def make_step(sae, shardings=None, dense=False):
    tx, schedule = make_optimizer(OPTIM, 1e-2, N_STEPS)
    step = make_train_step(sae, tx, schedule, N_STEPS, 0.0, dead_tokens=BATCH, shardings=shardings)
    return traced(step, sae, dense)


def run_steps(step, state, shardings, xs):
    """(final state on the host, per-step metrics: name -> float) of `step` on the batches xs."""
    metrics = []
    for x in xs:
        state, m = step(state, jnp.asarray(x) if shardings is None else jax.device_put(x, shardings[1]))
        metrics.append({k: float(v) for k, v in m.items()})
    return jax.device_get(state), metrics


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def agreement(got, got_metrics, want, want_metrics) -> dict:
    """How a sparse run (got: host state, per-step metrics) agrees with the dense one (want): the largest
    relative difference of the params, of Adam's moments, of the buffers and of the logged metrics; whether
    L0 and the fire counters match exactly; the paths each took."""
    floats = lambda tree: [leaf for leaf in jax.tree.leaves(tree) if np.issubdtype(leaf.dtype, np.floating)]
    names = sorted(set(want_metrics[0]) - {"step_path", "lr", "sparsity_coefficient"})
    return {
        "params": max(rel(got.params[k], want.params[k]) for k in want.params),
        "moments": max(rel(a, b) for a, b in zip(floats(got.opt_state), floats(want.opt_state))),
        "buffers": max([rel(got.buffers[k], want.buffers[k]) for k in want.buffers], default=0.0),
        "metrics": max(rel(g[k], w[k]) for g, w in zip(got_metrics, want_metrics) for k in names),
        "metric_names": names,
        "l0": [m["l0"] for m in got_metrics],
        "l0_equal": [m["l0"] for m in got_metrics] == [m["l0"] for m in want_metrics],
        "counts_equal": bool(np.array_equal(got.fire_counts, want.fire_counts))
        and bool(np.array_equal(got.tokens_since_fired, want.tokens_since_fired)),
        "paths": [int(m.get("step_path", -1)) for m in got_metrics],
        "dense_paths": [int(m.get("step_path", -1)) for m in want_metrics],
    }


def compare(name: str, mesh_shape=None, seed: int = 0, kernels: bool = False) -> dict:
    """`agreement` of a routed run of `name` and a dense-forced one from the same random params and batches
    (chosen by `sparse_setup`, whose paths come back as want_paths); with `kernels`, the CPU kernels the
    routed step's program calls."""
    sae = make(name)
    params, xs, paths = sparse_setup(sae, random_params(sae, seed), seed)
    start = initial_state(sae, params)
    state, shardings = on_devices(start, mesh_shape)
    step = make_step(sae, shardings)
    got = run_steps(step, state, shardings, xs)
    want = run_steps(make_step(sae, shardings, dense=True), *on_devices(start, mesh_shape), xs)
    out = {**agreement(*got, *want), "want_paths": paths, "dense_path": sae.paths - 1 if sae.paths > 1 else -1}
    if kernels:
        tx, schedule = make_optimizer(OPTIM, 1e-2, N_STEPS)
        jitted = make_train_step(sae, tx, schedule, N_STEPS, 0.0, dead_tokens=BATCH)
        text = jitted.lower(on_devices(start)[0], jnp.asarray(xs[0])).as_text()
        out["kernels"] = sorted(t for t in ("sae_top_k", "sae_gather_sum", "sae_scatter_columns") if t in text)
    return out


def check(result: dict, label: str, tol: dict = TOL) -> None:
    """The routed run took the wanted sparse paths, the forced run the dense one, and they agree."""
    assert result["paths"] == result["want_paths"], (label, result)
    assert result["dense_paths"] == [result["dense_path"]] * len(result["paths"]), (label, result)
    assert result["l0_equal"] and result["counts_equal"], (label, result)
    assert min(result["l0"]) > 0, (label, result)  # a code to compare
    for key, limit in tol.items():
        assert result[key] <= limit, (label, key, result)


def subprocess_json(code: str, env: dict | None = None, timeout: int = 900) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MESHES = [(1, 1), (8, 1), (4, 2)]  # data × model

MESH_DRIVER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax is imported
sys.path.insert(0, "tests/training")  # no conftest: no persistent cache (collectives loaded from it deadlock)
from test_sparse_paths_parallel import MESHES, NAMES, compare
print(json.dumps({f"{n} {d}x{m}": compare(n, (d, m)) for n in NAMES for d, m in MESHES}))
"""


@pytest.mark.slow
def test_sparse_paths_equal_dense_on_meshes():
    """Every family on meshes 1×1, 8×1 and 4×2 of 8 fake CPU devices: the routed steps (capacity families: paths
    0, 1, 0; BatchTopK/Matryoshka: SPARSE, SPARSE_AND_ROWS, SPARSE) equal the dense-forced steps on the same
    mesh."""
    results = subprocess_json(MESH_DRIVER)
    assert sorted(results) == sorted(f"{n} {d}x{m}" for n in NAMES for d, m in MESHES)
    for label, result in results.items():
        check(result, label)


PORTABLE_DRIVER = r"""
import json, sys
sys.path.insert(0, "tests/training")
from sae import kernels
from test_sparse_paths_parallel import NAMES, compare
assert kernels.available()
print(json.dumps({name: compare(name, kernels=True) for name in NAMES}))
"""


@pytest.mark.slow
def test_sparse_paths_equal_dense_with_portable_kernels(tmp_path):
    """On one device with the CPU kernels built without AVX-512 (their portable loops), every family's routed
    steps call the kernels and equal the dense-forced steps."""
    env = {**os.environ, "SAE_JAX_CACHE": str(tmp_path), "SAE_JAX_CXXFLAGS": "-mno-avx512f", "JAX_PLATFORMS": "cpu"}
    results = subprocess_json(PORTABLE_DRIVER, env)
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1  # built here, with the flag
    for name in NAMES:
        check(results[name], name)
        want = ["sae_gather_sum", "sae_scatter_columns", "sae_top_k"]
        assert results[name]["kernels"] == want, (name, results[name]["kernels"])


def sparse_data(seed: int, steps: int) -> np.ndarray:
    """[steps, BATCH, D_IN]: each row ~3 of 64 random unit directions with magnitudes in [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((64, D_IN))
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    codes = (rng.random((steps, BATCH, 64)) < 3 / 64) * rng.uniform(0.5, 1.5, (steps, BATCH, 64))
    return (codes @ features).astype(np.float32)


TRAIN_STEPS = 40


@pytest.mark.parametrize("name", CAPACITY)
def test_sparse_paths_equal_dense_from_trained_params(name):
    """From the family's init, 40 routed steps at lr 1e-2 (coefficient 1) make the code sparser: the last step
    takes a path of smaller capacity than the first (ReLU, ReLU April, Gated: dense, then mostly 256; JumpReLU:
    256, then 64). From the trained state, the routed steps (sparse) equal the dense-forced ones."""
    sae = make(name, **{FAMILIES[name].sparsity: 1.0})
    params = jax.device_get(sae.init_params(jax.random.key(1), jnp.zeros(D_IN)))
    xs = sparse_data(1, TRAIN_STEPS + STEPS)
    step = make_step(sae)
    trained, history = run_steps(step, *on_devices(initial_state(sae, params)), xs[:TRAIN_STEPS])
    dense = sae.paths - 1
    assert history[-1]["step_path"] < history[0]["step_path"], [m["step_path"] for m in history]
    got = run_steps(step, *on_devices(trained), xs[TRAIN_STEPS:])
    want = run_steps(make_step(sae, dense=True), *on_devices(trained), xs[TRAIN_STEPS:])
    result = agreement(*got, *want)
    assert all(path < dense for path in result["paths"]), result
    check({**result, "want_paths": result["paths"], "dense_path": dense}, name)


SWEEPS = {  # family -> (swept field, values)
    "relu": ("l1_coefficient", [0.3, 1.0, 3.0]),
    "jumprelu": ("l0_coefficient", [0.1, 0.3, 1.0]),
    "topk": ("k", [2, 3, 4]),
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_sweep_sparse_paths_equal_dense(name):
    """A one-pass sweep (`make_sweep_step`, as sae/training/sweep.py builds it) over λ or k: every instance takes
    the sparse paths and ends where the dense-forced sweep's instance ends."""
    field, values = SWEEPS[name]
    sae = make(name)
    params, xs, paths = sparse_setup(sae, random_params(sae, 2), 2)
    starts = []
    for value in values:
        state = initial_state(sae, params)
        if field == "k":
            state = state._replace(buffers={**state.buffers, "k": np.asarray(value, np.int32)})
        starts.append(state)
    coefficients = [0.0 if field == "k" else value for value in values]
    stacked = jax.tree.map(lambda *leaves: np.stack(leaves), *starts)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("instance",))
    tx, schedule = make_optimizer(OPTIM, 1e-2, N_STEPS)
    runs = []
    for dense in (False, True):
        pure = pure_train_step(sae, tx, schedule, N_STEPS, 0.0, BATCH)
        step = traced(make_sweep_step(pure, coefficients, mesh), sae, dense)
        runs.append(run_sweep(step, stacked, xs, len(values)))
    for i, value in enumerate(values):
        result = agreement(*runs[0][i], *runs[1][i])
        check({**result, "want_paths": paths, "dense_path": sae.paths - 1 if sae.paths > 1 else -1}, f"{field}={value}")
        if field == "k":
            assert result["l0"] == [value] * STEPS, result  # the instance's own k


def run_sweep(step, stacked, xs, n: int):
    """Per instance: (final state on the host, per-step metrics) of a sweep step on the batches xs."""
    states = jax.tree.map(jnp.array, stacked)
    metrics = []
    for x in xs:
        states, m = step(states, jnp.asarray(x))
        metrics.append(jax.device_get(m))
    states = jax.device_get(states)
    one = lambda i: (jax.tree.map(lambda a: a[i], states), [{k: float(v[i]) for k, v in m.items()} for m in metrics])
    return [one(i) for i in range(n)]


def test_jumprelu_entry_at_the_window_edge():
    """An entry with z − θ within rounding of −ε/2, where the route's slot test (x W_enc + (b_enc − θ + ε/2) > 0
    without its margin) and θ's window (|z − θ|/ε < ½) round differently: the sparse path still gives θ the
    dense path's gradient (the slots reach ε/128 past the window)."""
    sae = make("jumprelu")
    p = jax.device_get(sae.init_params(jax.random.key(0), jnp.zeros(D_IN)))
    x = jax.random.normal(jax.random.key(1), (8, D_IN))
    xw = np.asarray(x @ p["W_enc"])[0, 0]
    theta, eps = np.float32(0.1), np.float32(sae.cfg.bandwidth)
    b = np.full(D_SAE, -10.0, np.float32)  # every other entry far below its window
    b[0] = theta - eps / 2 - xw
    for _ in range(64):  # step b_enc[0] by ulps to where the two tests disagree
        slot = np.float32(xw + np.float32(np.float32(b[0] - theta) + eps / 2)) > 0
        if abs(np.float32(np.float32(xw + b[0]) - theta) / eps) < 0.5 and not slot:
            break
        b[0] = np.nextafter(b[0], np.float32(np.inf))
    else:
        pytest.fail("no b_enc[0] within 64 ulps puts the entry where the unmargined slot test and the window disagree")
    p = {**{k: jnp.asarray(v) for k, v in p.items()}, "b_enc": jnp.asarray(b)}
    path, plan = sae.route(p, {}, x)
    assert int(path) == 0
    dead, lam = jnp.zeros(D_SAE, bool), jnp.float32(0.3)
    loss = lambda q, i: sae.forward(q, {}, x, x, dead, lam, route=(i, plan)).loss
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    sparse, dense = (np.asarray(grad(p, i)["threshold"]) for i in (0, sae.paths - 1))
    assert dense[0] != 0.0 and np.array_equal(sparse[1:], dense[1:])
    np.testing.assert_allclose(sparse[0], dense[0], rtol=1e-6)
