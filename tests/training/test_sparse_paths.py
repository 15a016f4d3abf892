"""The train step's choice of path (`SAE.route`): BatchTopK and Matryoshka take their sparse path on a batch
where it is exact (a few rows overflowing their candidates taken in full) and the dense one where more rows
overflow (a batch forcing it), and either way the step equals the step that chooses inside the forward pass
(a second code path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae.architectures import FAMILIES, make_sae
from sae.architectures.batchtopk import DENSE, SPARSE, SPARSE_AND_ROWS
from sae.config import OptimConfig
from sae.training.step import init_state, make_optimizer, make_train_step

D, BATCH, STEPS = 16, 128, 3


def run(sae, batches):
    tx, schedule = make_optimizer(OptimConfig(), 1e-2, STEPS)
    params = sae.init(jax.random.PRNGKey(0), jnp.zeros(D))
    state = init_state(sae, params, tx, 1.0)
    step = make_train_step(sae, tx, schedule, STEPS, 0.0, dead_tokens=BATCH)  # dead after one batch: AuxK runs
    paths = []
    for batch in batches:
        state, metrics = step(state, batch)
        paths.append(float(metrics.get("step_path", -1.0)))
    return state, paths


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_the_step_takes_the_sparse_path_where_it_is_exact(name, monkeypatch):
    sae = make_sae(FAMILIES[name].config(d_sae=64, k=3), D)
    rng = np.random.default_rng(0)
    batches = rng.normal(size=(STEPS, BATCH, D)).astype(np.float32)
    batches *= np.sqrt(D) / np.linalg.norm(batches, axis=-1, keepdims=True)  # equal norms: no row overflows
    batches[1, :2] *= 50.0  # two rows hold more than 4k of the batch's top entries: taken in full, sparse step
    batches[2, :8] *= 50.0  # more than batch/32 = 4 such rows: the dense path
    state, paths = run(sae, jnp.asarray(batches))
    assert paths == [SPARSE, SPARSE_AND_ROWS, DENSE]
    monkeypatch.setattr(type(sae), "route", lambda self, *args: None)  # forward chooses by itself
    reference, unrouted = run(sae, jnp.asarray(batches))
    assert unrouted == [-1.0] * STEPS
    for key in state.params:
        np.testing.assert_allclose(state.params[key], reference.params[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(state.fire_counts, reference.fire_counts)
    np.testing.assert_allclose(state.buffers["threshold"], reference.buffers["threshold"], rtol=1e-6)
