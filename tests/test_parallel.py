"""Sharding: every architecture's train step (a CLT's and a skip transcoder's too) on 8 fake CPU devices,
meshes 1×1, 8×1, 4×2 and 1×8 (data × model), ends where the single-device step ends.

Tolerance: max |Δ| / max |param| ≤ 1e-3 per parameter after 4 Adam steps at lr 1e-2, and the L0 of
every step identical (so TopK / BatchTopK selections agree). Most families agree to ~1e-6; the
ReLU/Gated ones reach ~4e-4 because Adam divides near-zero gradients, whose float32 round-off differs
with the reduction order, by their own magnitude.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from sae.architectures import FAMILIES

DRIVER = r"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
import jax.numpy as jnp
import numpy as np

# no persistent compilation cache: jax 0.10.2 CPU executables with collectives, loaded from it, deadlock
from sae.architectures import make_sae
from sae.architectures import FAMILIES
from sae.architectures.topk import TopKConfig
from sae.config import MeshConfig, OptimConfig
from sae.training.step import init_state, make_optimizer, make_train_step
from sae.parallel import make_mesh, state_shardings, batch_sharding, replicated

D_IN, D_SAE, BATCH, STEPS = 16, 64, 64, 4

def run(name, mesh_shape):
    family, _, variant = name.partition("_")  # clt_topk: a TopK CLT; topk_skip: a skip transcoder
    cfg = FAMILIES[family].config(d_sae=D_SAE)
    if isinstance(cfg, TopKConfig):
        cfg.k = 4
    kx, kp = jax.random.split(jax.random.key(0))
    if family == "clt":  # 2 layers, pairs (x, y) of [batch, 2, d]
        cfg.activation, cfg.k = (variant or "jumprelu"), 4
        sae = make_sae(cfg, D_IN, D_IN, 2)
        xs = jax.nn.relu(jax.random.normal(kx, (STEPS, BATCH, 2, D_IN)))
        xs = [(x, jnp.cumsum(x, axis=1) - 0.3) for x in xs]
        params = sae.init(kp, jnp.zeros((2, D_IN)))
    elif variant == "skip":
        cfg.skip = True
        sae = make_sae(cfg, D_IN, D_IN // 2)
        xs = jax.nn.relu(jax.random.normal(kx, (STEPS, BATCH, D_IN)))
        xs = [(x, x[:, ::2] * x[:, 1::2] + x[:, ::2]) for x in xs]
        params = sae.init(kp, jnp.zeros(D_IN // 2))
    else:
        sae = make_sae(cfg, D_IN)
        xs = jax.nn.relu(jax.random.normal(kx, (STEPS, BATCH, D_IN)))
        params = sae.init_params(kp, jnp.zeros(D_IN))
    tx, schedule = make_optimizer(OptimConfig(), 1e-2, STEPS)
    state = init_state(sae, params, tx, 1.0)
    shardings = None
    if mesh_shape is not None:
        mesh = make_mesh(MeshConfig(*mesh_shape))
        sh = state_shardings(state, D_SAE, mesh)
        state = jax.device_put(state, sh)
        shardings = (sh, batch_sharding(mesh), replicated(mesh))
    step = make_train_step(sae, tx, schedule, STEPS, 0.0, 2 * BATCH, shardings)
    l0 = []
    for i in range(STEPS):
        x = xs[i] if shardings is None else jax.device_put(xs[i], shardings[1])
        state, m = step(state, x)
        l0.append(float(m["l0"]))
    return jax.device_get(state.params), l0

out = {}  # arch -> mesh -> agreement with the single-device run
for name in sys.argv[1].split(","):
    ref, ref_l0 = run(name, None)
    out[name] = {}
    for shape in [(1, 1), (8, 1), (4, 2), (1, 8)]:
        got, l0 = run(name, shape)
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)), got, ref)
        out[name][f"{shape[0]}x{shape[1]}"] = {"max_rel": max(jax.tree.leaves(diffs)), "l0_equal": l0 == ref_l0}
print(json.dumps(out))
"""


NAMES = [*sorted(FAMILIES), "clt_topk", "topk_skip"]  # clt: a 2-layer JumpReLU CLT; topk_skip: a skip transcoder


@pytest.fixture(scope="module")
def sharded_runs():
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, ",".join(NAMES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_sharded_steps_match_one_device(sharded_runs, name):
    for mesh, result in sharded_runs[name].items():
        assert result["l0_equal"], (name, mesh)
        assert result["max_rel"] <= 1e-3, (name, mesh, result)
