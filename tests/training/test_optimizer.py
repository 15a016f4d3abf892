"""`Optimizer.apply`, Adam in one pass, equals optax's update followed by optax.apply_updates, with and without
global-norm clipping (triggered on some steps, not on others), and keeps optax's state layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae.config import OptimConfig
from sae.training.optimizer import make_optimizer


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_one_pass_adam_equals_optax(grad_clip):
    tx, _ = make_optimizer(OptimConfig(grad_clip=grad_clip, warmup_fraction=0.3), 1e-2, 10)
    rng = np.random.default_rng(0)
    params = {"W": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
    grads = [{k: jnp.asarray(rng.normal(size=v.shape) * s, jnp.float32) for k, v in params.items()} for s in (0.1, 3)]
    ours, ours_state = params, tx.init(params)
    ref, ref_state = params, tx.tx.init(params)
    norms = []
    for step in range(6):
        g = grads[step % 2]
        norms.append(float(optax.tree.norm(g)))
        ours, ours_state = jax.jit(tx.apply)(g, ours_state, ours)
        updates, ref_state = tx.update(g, ref_state, ref)
        ref = optax.apply_updates(ref, updates)
        for k in params:
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=f"step {step} {k}")
    assert min(norms) < 1.0 < max(norms)  # clipping, where set, triggers on some steps and not on others
    assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
    for a, b in zip(jax.tree.leaves(ours_state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
