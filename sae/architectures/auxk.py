"""AuxK (Gao et al. 2024, §A.2): the auxiliary loss that revives dead latents in the TopK family."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sae.architectures.base import Params, encoder_bias, selected_preacts, squared_error, total_variance
from sae.architectures.sparse import gather_sum, top_k_of


def _auxk_value(params: Params, x, variance, residual, xw, dead, k_aux: int, pre_bias: bool) -> jax.Array:
    """‖e − ê‖² · Var(y) / Var(e), with ê = Σ TopK_aux(ReLU(z_dead)) W_dec: the AuxK term for some dead
    latents (variance: Var(y) of the target, y = x for an SAE). Dividing by the residual's variance is Gao
    et al.'s normalised MSE (their code, as in sparsify and dictionary_learning); the factor Var(y) puts it on
    the scale of the main term ‖y − ŷ‖², their normalised MSE times Var(y), so α weighs the two as in the paper."""
    bias = jax.lax.stop_gradient(encoder_bias(params, pre_bias))
    _, idx = top_k_of(xw, jnp.where(dead, bias, -jnp.inf), k_aux, relu=False)
    vals = jax.nn.relu(selected_preacts(params, x, xw, idx, pre_bias)) * dead[idx]
    var_e = total_variance(residual)
    scale = jnp.where(var_e > 0, variance / jnp.where(var_e > 0, var_e, 1.0), 0.0)
    return squared_error(residual, gather_sum(vals, params["W_dec"], idx)) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _auxk(params: Params, x, variance, residual, xw, dead, k_aux: int, pre_bias: bool) -> jax.Array:
    return jax.lax.cond(
        jnp.any(dead),
        lambda: _auxk_value(params, x, variance, residual, xw, dead, k_aux, pre_bias),
        lambda: jnp.zeros((), x.dtype),
    )


def _auxk_fwd(params, x, variance, residual, xw, dead, k_aux, pre_bias):
    saved = (params, x, variance, residual, xw, dead)
    return _auxk(params, x, variance, residual, xw, dead, k_aux, pre_bias), saved


def _auxk_bwd(k_aux, pre_bias, saved, g):
    """Recomputes the selection under its own `lax.cond`: differentiating through the forward's
    cond would make it emit (and, with no dead latent, zero-fill) every residual of the AuxK branch."""
    params, x, variance, residual, xw, dead = saved

    def grads():
        _, vjp = jax.vjp(lambda p: _auxk_value(p, x, variance, residual, xw, dead, k_aux, pre_bias), params)
        return vjp(g)[0]

    zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    return jax.lax.cond(jnp.any(dead), grads, zeros), None, None, None, None, None


_auxk.defvjp(_auxk_fwd, _auxk_bwd)


def auxk_loss(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    y_hat: jax.Array,
    xw: jax.Array,
    dead: jax.Array,
    k_aux: int,
    pre_bias: bool,
) -> jax.Array:
    """AuxK (Gao et al. 2024, §A.2): the error of predicting e = y − ŷ (stop-gradient; y = x for an SAE) from the
    top k_aux dead latents, ê = Σ TopK_aux(ReLU(z_dead)) W_dec (no b_dec), normalised as in
    `_auxk_value`. xw: [batch, d_sae] = x W_enc, without gradient. Computed only when some latent is
    dead (a `lax.cond`, one branch runs)."""
    residual = jax.lax.stop_gradient(y - y_hat)
    variance = jax.lax.stop_gradient(total_variance(y))
    return _auxk(params, x, variance, residual, xw, dead, min(k_aux, xw.shape[-1]), pre_bias)
