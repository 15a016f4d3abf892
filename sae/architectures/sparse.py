"""The sparse operations of the TopK family's step, and where they run: XLA or sae.kernels' CPU kernels.

TopK never forms a dense `[batch, d_sae]` gradient: the active latents are chosen on the
pre-activations computed without gradient, `take_with_sparse_grad` reads their values and sends
the encoder's gradient to just those k columns per token, and the decoder (`gather_sum`) sums k
gathered rows. Both backward passes are scatters of k rows per token instead of dense
`[d_in, d_sae]` matmuls: one dense matmul per step remains.

How a trace places the latents decides which implementation runs (`latent_sharded_top_k`,
`per_device_code`): the CPU kernels and XLA's CPU optimisation barrier only where no SPMD partitioner
has to split them.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from sae import kernels


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
def matmul_from(xw: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    """x w, given as xw (computed once, without gradient, for a step's route): the gradient reaches x and w
    as a matmul's would, so a dense path reuses the route's product instead of computing it again."""
    return xw


def _matmul_from_fwd(xw, x, w):
    return xw, (x, w)


def _matmul_from_bwd(res, g):
    x, w = res
    return None, g @ w.T, x.T @ g


matmul_from.defvjp(_matmul_from_fwd, _matmul_from_bwd)


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


def scatter_dense(vals: jax.Array, idx: jax.Array, d_sae: int) -> jax.Array:
    """[batch, k] values at idx -> dense [batch, d_sae] code."""
    rows = jnp.arange(vals.shape[0])[:, None]
    return jnp.zeros((vals.shape[0], d_sae), vals.dtype).at[rows, idx].set(vals)


def fire_counts_from_indices(vals: jax.Array, idx: jax.Array, d_sae: int) -> jax.Array:
    """[d_sae] int32: for each latent, the tokens of the batch where its value is positive."""
    return jnp.zeros((d_sae,), jnp.int32).at[idx.reshape(-1)].add((vals.reshape(-1) > 0).astype(jnp.int32))
