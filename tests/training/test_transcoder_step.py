"""One step for SAEs and transcoders: a batch (x, x) trains exactly what x does; a transcoder's FVU is against
y; a skip transcoder trains W_skip (from zero) in the same step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae.architectures import FAMILIES, make_sae
from sae.config import OptimConfig
from sae.training.step import init_state, make_optimizer, make_train_step

D, D_OUT, STEPS, BATCH = 12, 8, 4, 64
PER_LAYER = [name for name, family in FAMILIES.items() if not family.cross_layer]


def run(sae, batches, key=0):
    tx, schedule = make_optimizer(OptimConfig(), 1e-2, STEPS)
    params = sae.init(jax.random.PRNGKey(key), jnp.zeros(sae.d_out))
    state = init_state(sae, params, tx, 1.0)
    step = make_train_step(sae, tx, schedule, STEPS, 0.0, dead_tokens=BATCH)  # dead after one batch: AuxK runs
    for batch in batches:
        state, metrics = step(state, batch)
    return state, metrics


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(STEPS, BATCH, D)).astype(np.float32)
    w = rng.normal(size=(D, D_OUT)).astype(np.float32) / np.sqrt(D)
    return x, np.maximum(x @ w, 0) + 0.1 * (x[..., :D_OUT] > 0)  # a nonlinear target


@pytest.mark.parametrize("name", PER_LAYER)
def test_pairs_with_y_equal_x_train_the_same_weights(name):
    """The SAE is the case y = x of one code path: the same SAE trained on batches x and on pairs (x, x)
    ends with bit-identical parameters and counters."""
    sae = make_sae(FAMILIES[name].config(d_sae=16), D)
    x, _ = data()
    alone, metrics_alone = run(sae, [jnp.asarray(b) for b in x])
    paired, metrics_paired = run(sae, [(jnp.asarray(b), jnp.asarray(b)) for b in x])
    for key in alone.params:
        np.testing.assert_array_equal(alone.params[key], paired.params[key], err_msg=key)
    np.testing.assert_array_equal(alone.fire_counts, paired.fire_counts)
    assert float(metrics_alone["loss"]) == float(metrics_paired["loss"])


@pytest.mark.parametrize("name", ["topk", "relu", "jumprelu", "batchtopk"])
def test_transcoder_step_predicts_y(name):
    """d_out ≠ d_in: no pre-bias, b_dec [d_out], FVU against y equal to a NumPy FVU of the prediction."""
    sae = make_sae(FAMILIES[name].config(d_sae=16, skip=True), D, D_OUT)
    assert sae.transcoder and not sae.applies_pre_bias
    x, y = data(1)
    batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(x, y)]
    state, metrics = run(sae, batches)
    assert state.params["W_dec"].shape == (16, D_OUT) and state.params["b_dec"].shape == (D_OUT,)
    assert np.abs(np.asarray(state.params["W_skip"])).max() > 0  # trained from zero
    # the step's FVU is that of the parameters it started from (before its update): recompute one step
    tx, schedule = make_optimizer(OptimConfig(), 1e-2, STEPS)
    step = make_train_step(sae, tx, schedule, STEPS, 0.0, dead_tokens=BATCH)
    params = {k: jnp.array(np.asarray(v)) for k, v in state.params.items()}
    xb, yb = x[0], y[0]
    y_hat = np.asarray(sae(params, jnp.asarray(xb), state.buffers))
    _, metrics = step(init_state(sae, params, tx, 1.0), batches[0])
    if name == "batchtopk":  # training uses the batch threshold, inference the running one: check the metric's form
        assert 0 < float(metrics["fvu"]) < 2
        return
    fvu = ((yb - y_hat) ** 2).sum() / ((yb - yb.mean(0)) ** 2).sum()
    np.testing.assert_allclose(float(metrics["fvu"]), fvu, rtol=1e-4)
