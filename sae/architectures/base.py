"""What every SAE family shares: parameter layout, pre-bias encoder, decoders, loss assembly, AuxK.

Notation (../shared/references.md): x: [batch, d_in]; W_enc: [d_in, d_sae]; W_dec: [d_sae, d_in]
(row i is latent i's direction); b_enc: [d_sae]; b_dec: [d_in]; f: [batch, d_sae]; x̂ = f W_dec + b_dec.

TopK never forms a dense `[batch, d_sae]` gradient: the active latents are chosen on the
pre-activations computed without gradient, `take_with_sparse_grad` reads their values and sends
the encoder's gradient to just those k columns per token, and the decoder (`gather_sum`) sums k
gathered rows. Both backward passes are scatters of k rows per token instead of dense
`[d_in, d_sae]` matmuls: one dense matmul per step remains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sae import kernels

Params = dict[str, jax.Array]


class Forward(NamedTuple):
    """One training forward pass.

    loss: scalar to minimise; x_hat: [batch, d_in]; fire_counts: [d_sae] int32, the tokens of
    the batch each latent is active on (feeds the dead-latent counters and the density histograms); l0: scalar, mean active latents per token;
    terms: named scalar loss terms for logging; buffers: the architecture's updated
    non-trainable state (e.g. BatchTopK's inference threshold).
    """

    loss: jax.Array
    x_hat: jax.Array
    fire_counts: jax.Array
    l0: jax.Array
    terms: dict[str, jax.Array]
    buffers: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SAE:
    """Base of every family: holds the (static, hashable) architecture config.

    Subclasses implement `init_params`, `encode` (the inference rule) and `forward` (training pass);
    they may override `decode`, `init_buffers`, `project_grads` and `post_update`.
    """

    cfg: Any
    d_in: int

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # --- parameters ---------------------------------------------------------------------------
    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        raise NotImplementedError

    def init_buffers(self) -> dict[str, jax.Array]:
        return {}

    # --- inference ------------------------------------------------------------------------------
    def encode(self, params: Params, x: jax.Array, buffers: dict[str, jax.Array]) -> jax.Array:
        """x: [batch, d_in] -> f: [batch, d_sae] by the family's inference rule."""
        raise NotImplementedError

    def decode(self, params: Params, f: jax.Array) -> jax.Array:
        """f: [batch, d_sae] -> x̂: [batch, d_in]."""
        return f @ params["W_dec"] + params["b_dec"]

    # --- training -------------------------------------------------------------------------------
    def forward(
        self,
        params: Params,
        buffers: dict[str, jax.Array],
        x: jax.Array,
        dead: jax.Array,
        sparsity_coefficient: jax.Array,
    ) -> Forward:
        """Training pass. dead: [d_sae] bool (for AuxK); sparsity_coefficient: warmed-up λ."""
        raise NotImplementedError

    def project_grads(self, params: Params, grads: Params) -> Params:
        """Gradient transform before the optimiser (unit-norm families remove the radial part)."""
        return grads

    def post_update(self, params: Params) -> Params:
        """Constraint applied after the optimiser step (e.g. decoder renormalisation)."""
        return params

    @property
    def sparsity_coefficient(self) -> float:
        """The λ that the warm-up schedule scales (0 for families without a penalty)."""
        return 0.0


# --- initialisation ---------------------------------------------------------------------------


def random_unit_rows(key: jax.Array, n: int, d: int) -> jax.Array:
    """[n, d] rows drawn uniformly on the unit sphere."""
    w = jax.random.normal(key, (n, d))
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def tied_init(key: jax.Array, d_sae: int, d_in: int, b_dec: jax.Array, row_norm: float = 1.0) -> Params:
    """W_dec rows random with norm `row_norm`, W_enc = W_decᵀ, b_enc = 0 (Gao et al. 2024 §2.3)."""
    w_dec = row_norm * random_unit_rows(key, d_sae, d_in)
    return {
        "W_enc": w_dec.T,
        "b_enc": jnp.zeros((d_sae,)),
        "W_dec": w_dec,
        "b_dec": jnp.asarray(b_dec, jnp.float32),
    }


# --- encoder ------------------------------------------------------------------------------------


def encoder_bias(params: Params, pre_bias: bool) -> jax.Array:
    """[d_sae] b_enc − b_dec W_enc with the pre-bias, else b_enc.

    Applying the pre-bias as x W − (b_dec W) makes b_dec's gradient through the encoder a
    vector–matrix product, not a `[batch, d_in]` one.
    """
    if pre_bias:
        return params["b_enc"] - params["b_dec"] @ params["W_enc"]
    return params["b_enc"]


def preacts(params: Params, x: jax.Array, pre_bias: bool) -> jax.Array:
    """[batch, d_sae] pre-activations (x − b_dec) W_enc + b_enc, or x W_enc + b_enc without the pre-bias."""
    return x @ params["W_enc"] + encoder_bias(params, pre_bias)


def selected_preacts(params: Params, x: jax.Array, xw: jax.Array, idx: jax.Array, pre_bias: bool) -> jax.Array:
    """[batch, k] pre-activations of the latents idx, read from xw = x W_enc: [batch, d_sae] (computed
    once, without gradient); the gradient reaches W_enc through k scattered columns per token."""
    return take_with_sparse_grad(xw, x, params["W_enc"], idx) + encoder_bias(params, pre_bias)[idx]


def _xla_gather_dot(x, w_rows, idx):
    def body(j, out):
        return out.at[j].set(jnp.sum(x * w_rows[idx[:, j]], axis=-1))

    return jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros(idx.shape[::-1], x.dtype)).T


def _xla_gather_sum(vals, w_rows, idx):
    def body(j, out):
        return out + vals[:, j, None] * w_rows[idx[:, j]]

    init = jnp.zeros((vals.shape[0], w_rows.shape[1]), w_rows.dtype)
    return jax.lax.fori_loop(0, idx.shape[1], body, init)


def _xla_scatter_outer(vals, x, idx, n_rows):
    def body(j, out):
        return out.at[idx[:, j]].add(vals[:, j, None] * x)

    return jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros((n_rows, x.shape[1]), x.dtype))


def _cpu_kernels(*arrays) -> bool:
    """Use sae.kernels' CPU kernels: not in SPMD-partitioned traces (GSPMD cannot partition a custom call)."""
    return _TRACE[-1][0] != "sharded" and kernels.usable(*arrays)


def _gather_sum(vals, w_rows, idx):
    """[batch, d] = Σ_j vals[b, j] · w_rows[idx[b, j]]."""
    if _cpu_kernels(vals, w_rows):
        return kernels.gather_sum(vals, w_rows, idx, _xla_gather_sum)
    return _xla_gather_sum(vals, w_rows, idx)


def _scatter_columns(vals, x, idx, n):
    """[d, n]: column idx[b, j] gets vals[b, j] · x[b], summed (the encoder's sparse gradient)."""
    fallback = lambda v, r, i: _xla_scatter_outer(v, r, i, n).T
    if _cpu_kernels(vals, x):
        return kernels.scatter_columns(vals, x, idx, n, fallback)
    return fallback(vals, x, idx)


@jax.custom_vjp
def take_with_sparse_grad(xw: jax.Array, x: jax.Array, w: jax.Array, idx: jax.Array) -> jax.Array:
    """out[b, j] = xw[b, idx[b, j]], where xw = x w: [batch, n] was computed without gradient.

    x: [batch, d]; w: [d, n]; idx: [batch, k]. The gradient reaches w as if out were x[b]·w[:, idx[b, j]]
    (a scatter of k columns per token, not a dense matmul); none reaches xw or the data x.
    """
    return jnp.take_along_axis(xw, idx, axis=1)


def _take_fwd(xw, x, w, idx):
    return jnp.take_along_axis(xw, idx, axis=1), (x, w.shape[1], idx)


def _take_bwd(res, g):
    x, n, idx = res
    return None, None, _scatter_columns(g, x, idx, n), None


take_with_sparse_grad.defvjp(_take_fwd, _take_bwd)


@jax.custom_vjp
def gather_sum(vals: jax.Array, w_rows: jax.Array, idx: jax.Array) -> jax.Array:
    """out[b] = Σ_j vals[b, j] · w_rows[idx[b, j]]. vals, idx: [batch, k]; w_rows: [n, d]."""
    return _gather_sum(vals, w_rows, idx)


def _gather_sum_fwd(vals, w_rows, idx):
    return _gather_sum(vals, w_rows, idx), (vals, w_rows, idx)


def _xla_gather_sum_grad(vals, w_rows, idx, g):
    return _xla_gather_dot(g, w_rows, idx), _xla_scatter_outer(vals, g, idx, w_rows.shape[0])


def _gather_sum_bwd(res, g):
    vals, w_rows, idx = res
    if _cpu_kernels(vals, w_rows, g):
        return (*kernels.gather_sum_grad(vals, w_rows, idx, g, _xla_gather_sum_grad), None)
    return (*_xla_gather_sum_grad(vals, w_rows, idx, g), None)


gather_sum.defvjp(_gather_sum_fwd, _gather_sum_bwd)


# How the current trace places latents: "device" (one device: CPU kernels and the optimisation barrier
# allowed), "per_device" (shard_map's per-device code: kernels, no barrier) or "sharded" (latents split
# over `shards` devices by the SPMD partitioner: neither).
_TRACE = [("device", 1)]


@contextlib.contextmanager
def _trace_mode(mode: str, shards: int = 1):
    _TRACE.append((mode, shards))
    try:
        yield
    finally:
        _TRACE.pop()


def latent_sharded_top_k(model_shards: int):
    """Trace top-k for latents split contiguously over `model_shards` devices (sharded train steps).

    Each shard takes its local top-k, then one top-k runs over the M·k gathered candidates (OpenAI's
    sharded top-k), so no device ever holds a whole [batch, d_sae] row. The CPU optimisation barrier and
    the CPU kernels are left out: XLA's SPMD partitioner can handle neither.
    """
    return _trace_mode("sharded", model_shards)


def per_device_code():
    """Trace code that shard_map runs on each device by itself: kernels yes, optimisation barrier no."""
    return _trace_mode("per_device")


def _sharded_top_k(z: jax.Array, k: int, shards: int) -> tuple[jax.Array, jax.Array]:
    """Exact top-k of z: [batch, n] as local top-k per contiguous block of n/shards, then a global one."""
    batch, n = z.shape
    local_k = min(k, n // shards)
    vals, idx = jax.lax.top_k(z.reshape(batch, shards, n // shards), local_k)  # [batch, shards, local_k]
    idx = idx + (n // shards) * jnp.arange(shards)[None, :, None]
    values, pos = jax.lax.top_k(vals.reshape(batch, shards * local_k), k)
    return values, jnp.take_along_axis(idx.reshape(batch, shards * local_k), pos, axis=1)


def exact_top_k(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Row-wise top-k of z: [batch, n] -> (values, indices): [batch, k], exact; ~2× `lax.top_k` on CPU.

    Columns are split into n/g strided blocks {c, c + n/g, c + 2n/g, ...} of g members. The k blocks
    with the largest maxima contain every top-k element (each holds an element ≥ the k-th largest
    block maximum), so a top-k over their k·g members is exact. Strided blocks make the block maxima
    an elementwise max of g contiguous slices. Falls back to `lax.top_k` where blocking does not pay.

    The results pass an optimisation barrier: XLA's CPU compiler otherwise rewrites a top-k whose
    consumer slices it (e.g. takes the k-th column) into a full sort, 10× slower. Sharded steps take
    the sharded path instead (`latent_sharded_top_k`).
    """
    batch, n = z.shape
    mode, shards = _TRACE[-1]
    if mode != "device":
        return _sharded_top_k(z, k, shards) if shards > 1 and n % shards == 0 else jax.lax.top_k(z, k)
    g = next((g for g in (32, 16, 8) if n % g == 0 and n // g >= 2 * k), None)
    if g is None:
        return jax.lax.optimization_barrier(jax.lax.top_k(z, k))
    blocks = z.reshape(batch, g, n // g)  # blocks[:, i, c] = z[:, c + i·n/g]
    _, block_idx = jax.lax.top_k(blocks.max(axis=1), k)  # [batch, k]
    members = jnp.take_along_axis(blocks, jnp.broadcast_to(block_idx[:, None, :], (batch, g, k)), axis=2)
    values, pos = jax.lax.top_k(members.reshape(batch, g * k), k)
    idx = jnp.take_along_axis(block_idx, pos % k, axis=1) + (n // g) * (pos // k)
    return jax.lax.optimization_barrier((values, idx))


def top_k_of(z: jax.Array, bias: jax.Array, k: int, relu: bool = True) -> tuple[jax.Array, jax.Array]:
    """Row-wise exact top-k of ReLU(z + bias) (or of z + bias): z [batch, n], bias [n] ->
    (values descending, indices): [batch, k]; ties go to the lower index. The CPU kernel reads z from
    memory once, with the bias add and ReLU fused in; elsewhere `exact_top_k` runs."""

    def xla(z, bias):
        a = z + bias
        return tuple(exact_top_k(jax.nn.relu(a) if relu else a, k))

    if _cpu_kernels(z, bias):
        return kernels.top_k(z, bias, k, relu, xla)
    return xla(z, bias)


def decode_sparse(params: Params, vals: jax.Array, idx: jax.Array) -> jax.Array:
    """x̂ = Σ_j vals[:, j] W_dec[idx[:, j]] + b_dec. vals, idx: [batch, k]."""
    return gather_sum(vals, params["W_dec"], idx) + params["b_dec"]


def scatter_dense(vals: jax.Array, idx: jax.Array, d_sae: int) -> jax.Array:
    """[batch, k] values at idx -> dense [batch, d_sae] code."""
    rows = jnp.arange(vals.shape[0])[:, None]
    return jnp.zeros((vals.shape[0], d_sae), vals.dtype).at[rows, idx].set(vals)


def fire_counts_from_indices(vals: jax.Array, idx: jax.Array, d_sae: int) -> jax.Array:
    """[d_sae] int32: for each latent, the tokens of the batch where its value is positive."""
    return jnp.zeros((d_sae,), jnp.int32).at[idx.reshape(-1)].add((vals.reshape(-1) > 0).astype(jnp.int32))


# --- losses -------------------------------------------------------------------------------------


def squared_error(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """mean over the batch of ‖x − x̂‖² (summed over d_in), the reconstruction term of every family."""
    return jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1))


def total_variance(a: jax.Array) -> jax.Array:
    """mean over the batch of ‖a − mean(a)‖²: a: [batch, d]."""
    return jnp.mean(jnp.sum(jnp.square(a - jnp.mean(a, axis=0)), axis=-1))


def _auxk_value(params: Params, x, residual, xw, dead, k_aux: int, pre_bias: bool) -> jax.Array:
    """‖e − ê‖² · Var(x) / Var(e), with ê = Σ TopK_aux(ReLU(z_dead)) W_dec: the AuxK term for some dead
    latents. Dividing by the residual's variance is Gao et al.'s normalised MSE (their code, as in
    sparsify and dictionary_learning); the factor Var(x) puts it on the scale of the main term
    ‖x − x̂‖², which is their normalised MSE times Var(x), so α weighs the two as in the paper."""
    bias = jax.lax.stop_gradient(encoder_bias(params, pre_bias))
    _, idx = top_k_of(xw, jnp.where(dead, bias, -jnp.inf), k_aux, relu=False)
    vals = jax.nn.relu(selected_preacts(params, x, xw, idx, pre_bias)) * dead[idx]
    var_e = total_variance(residual)
    scale = jnp.where(var_e > 0, total_variance(x) / jnp.where(var_e > 0, var_e, 1.0), 0.0)
    return squared_error(residual, gather_sum(vals, params["W_dec"], idx)) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _auxk(params: Params, x, residual, xw, dead, k_aux: int, pre_bias: bool) -> jax.Array:
    return jax.lax.cond(jnp.any(dead), lambda: _auxk_value(params, x, residual, xw, dead, k_aux, pre_bias),
                        lambda: jnp.zeros((), x.dtype))


def _auxk_fwd(params, x, residual, xw, dead, k_aux, pre_bias):
    return _auxk(params, x, residual, xw, dead, k_aux, pre_bias), (params, x, residual, xw, dead)


def _auxk_bwd(k_aux, pre_bias, saved, g):
    """Recomputes the selection under its own `lax.cond`: differentiating through the forward's
    cond would make it emit (and, with no dead latent, zero-fill) every residual of the AuxK branch."""
    params, x, residual, xw, dead = saved

    def grads():
        _, vjp = jax.vjp(lambda p: _auxk_value(p, x, residual, xw, dead, k_aux, pre_bias), params)
        return vjp(g)[0]

    return jax.lax.cond(jnp.any(dead), grads, lambda: jax.tree.map(jnp.zeros_like, params)), None, None, None, None


_auxk.defvjp(_auxk_fwd, _auxk_bwd)


def auxk_loss(
    params: Params, x: jax.Array, x_hat: jax.Array, xw: jax.Array, dead: jax.Array, k_aux: int, pre_bias: bool
) -> jax.Array:
    """AuxK (Gao et al. 2024, §A.2): the error of reconstructing e = x − x̂ (stop-gradient) from the
    top k_aux dead latents, ê = Σ TopK_aux(ReLU(z_dead)) W_dec (no b_dec), normalised as in
    `_auxk_value`. xw: [batch, d_sae] = x W_enc, without gradient. Computed only when some latent is
    dead (a `lax.cond`, one branch runs)."""
    residual = jax.lax.stop_gradient(x - x_hat)
    return _auxk(params, x, residual, xw, dead, min(k_aux, xw.shape[-1]), pre_bias)


# --- unit-norm decoder constraint ----------------------------------------------------------------


def remove_parallel_component(w_dec: jax.Array, grad: jax.Array) -> jax.Array:
    """Project out of each row's gradient its component along that (unit) row (Bricken et al. 2023)."""
    w_hat = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    return grad - jnp.sum(grad * w_hat, axis=-1, keepdims=True) * w_hat


def unit_rows(w: jax.Array) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class UnitNormDecoder(SAE):
    """Mixin for families whose decoder rows are kept at unit norm."""

    def project_grads(self, params: Params, grads: Params) -> Params:
        return {**grads, "W_dec": remove_parallel_component(params["W_dec"], grads["W_dec"])}

    def post_update(self, params: Params) -> Params:
        return {**params, "W_dec": unit_rows(params["W_dec"])}
