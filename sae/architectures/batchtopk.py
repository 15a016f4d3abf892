"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

  z = (x − b_dec) W_enc + b_enc,  r = ReLU(z)
  training:   f = r · 1[r ≥ τ_batch], τ_batch the (k·batch)-th largest entry of r over the whole batch
  inference:  f = r · 1[r > θ], θ = EMA of the smallest kept activation (τ_batch) during training (§3)
  loss = ‖x − x̂‖² + α L_aux (AuxK as in TopK, α = 1/32)

So the batch, not each token, has k·batch active latents: L0 averages k but varies per token.

The step is sparse: τ is selected from each row's top 4k candidates (`batch_threshold`), and when every
row's kept entries are among its candidates (no row "overflows") the kept ones are the code, as
(values, indices) with the others' index −1: decoded by a gather-sum, their encoder gradient scattered into
their columns, as TopK's step. A batch where a row overflows takes the dense path, so every step is exact;
the train step chooses per step with `lax.cond` (`route`), without recompiling.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sae.architectures.auxk import auxk_loss
from sae.architectures.base import (
    Forward,
    Params,
    UnitNormDecoder,
    decode_sparse,
    encoder_bias,
    register,
    selected_preacts,
    squared_error,
    tied_init,
    topk_family_lr,
)
from sae.architectures.sparse import fire_counts_from_indices, matmul_from, top_k_of
from sae.architectures.topk import TopKConfig
from sae.errors import require


@dataclasses.dataclass
class BatchTopKConfig(TopKConfig):
    name: str = "batchtopk"
    threshold_ema_decay: float = 0.99  # SAELens's topk_threshold_lr = 0.01

    def check(self) -> None:
        super().check()
        require(
            0 <= self.threshold_ema_decay < 1, f"sae.threshold_ema_decay={self.threshold_ema_decay} must be in [0, 1)"
        )


def kth_largest_nonnegative(r: jax.Array, n: int) -> jax.Array:
    """Exact n-th largest entry of a non-negative array by radix select on its float32 bit pattern
    (monotone for non-negative floats): four passes, each a 256-bin histogram of the next 8 bits
    among the entries that share the bits chosen so far. No sort."""
    bits = jax.lax.bitcast_convert_type(r.astype(jnp.float32), jnp.int32).reshape(-1)
    bits = jnp.maximum(bits, 0)  # −0.0 has the sign bit set; rank it as 0
    prefix, remaining = jnp.int32(0), jnp.int32(n)  # the answer's bits so far; rank within the prefix
    for shift in (24, 16, 8, 0):
        match = (bits >> (shift + 8)) == (prefix >> (shift + 8)) if shift < 24 else True
        digit = (bits >> shift) & 255
        counts = jnp.zeros(257, jnp.int32).at[jnp.where(match, digit, 256)].add(1)[:256]
        at_least = jnp.cumsum(counts[::-1])[::-1]  # at_least[d]: matching entries with digit ≥ d
        d = jnp.sum(at_least >= remaining) - 1  # the largest digit still holding the n-th entry
        remaining = remaining - jnp.where(d < 255, at_least[jnp.minimum(d + 1, 255)], 0)
        prefix = prefix | (d << shift)
    return jax.lax.bitcast_convert_type(prefix, jnp.float32)


class Selection(NamedTuple):
    """τ and where the batch's kept entries lie, from each row's top candidates (`select`)."""

    tau: jax.Array  # [] the (k·batch)-th largest entry, exactly
    overflow: jax.Array  # [batch] bool: rows whose kept entries may not all be among their candidates
    rows: jax.Array  # [max_rows] the overflowing rows first (then any others: see `valid`)
    valid: jax.Array  # [max_rows] bool: rows[i] overflows
    few: jax.Array  # [] bool: at most max_rows rows overflow (they can be taken in full)


def select(candidates: jax.Array, k: int, d_sae: int, full_rows, everything) -> Selection:
    """τ from each row's top candidates [batch, c] (descending). A row whose last candidate reaches τ may
    hold more of the batch's top entries than it offered ("overflows"): up to batch/32 such rows join the
    pool in full (full_rows(rows) -> [max_rows, d_sae]; their candidates dropped) and τ is recomputed;
    beyond that everything() gives it from the whole array. A row not overflowing at τ cannot overflow at
    the recomputed τ' ≥ τ, so each is exact."""
    batch, n_candidates = candidates.shape
    n, max_rows = k * batch, max(1, batch // 32)
    tau = kth_largest_nonnegative(candidates, n)
    last = candidates[:, -1]
    overflow = (last >= tau) & (last > 0) & (n_candidates < d_sae)
    n_overflow = jnp.sum(overflow)
    _, rows = jax.lax.top_k(overflow.astype(jnp.float32), max_rows)  # the overflowing rows first
    valid = overflow[rows]

    def with_full_rows():
        pool = jnp.concatenate(
            [
                jnp.where(overflow[:, None], 0.0, candidates).reshape(-1),
                jnp.where(valid[:, None], full_rows(rows), 0.0).reshape(-1),
            ]
        )
        return kth_largest_nonnegative(pool, n)

    branch = jnp.where(n_overflow == 0, 0, jnp.where(n_overflow <= max_rows, 1, 2))
    tau = jax.lax.switch(branch, [lambda: tau, with_full_rows, everything])
    return Selection(tau, overflow, rows, valid, n_overflow <= max_rows)


def batch_threshold(r: jax.Array, k: int) -> jax.Array:
    """τ: the (k·batch)-th largest entry of r: [batch, d_sae] (non-negative), exactly (see `select`)."""
    batch, d_sae = r.shape
    candidates, _ = top_k_of(r, jnp.zeros((d_sae,), r.dtype), min(4 * k, d_sae), relu=False)
    return select(candidates, k, d_sae, lambda rows: r[rows], lambda: kth_largest_nonnegative(r, k * batch)).tau


SPARSE, SPARSE_AND_ROWS, DENSE = 0, 1, 2  # BatchTopK's step paths (`BatchTopK.route`)


def update_threshold(threshold: jax.Array, tau: jax.Array, decay: float) -> jax.Array:
    """EMA of the batch threshold; the first batch (threshold < 0: unset) sets it."""
    return jnp.where(threshold < 0, tau, decay * threshold + (1 - decay) * tau)


@register
@dataclasses.dataclass(frozen=True)
class BatchTopK(UnitNormDecoder):
    name = "batchtopk"
    config = BatchTopKConfig
    saelens = "jumprelu"  # inference: ReLU(z) · 1[z > θ], θ the scalar threshold broadcast to [d_sae]
    pre_bias = True

    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        return tied_init(key, self.d_sae, self.d_in, b_dec)

    def init_buffers(self):
        return {"threshold": jnp.array(-1.0, jnp.float32)}  # strongly typed, as the step returns it

    def inference_params(self, params, buffers):
        """r · 1[r > θ] with r = ReLU(z) is SAELens's ReLU(z) · 1[z > θ] for θ ≥ 0, and ReLU(z) for θ < 0 (the
        unset sentinel), which is θ = 0: so the threshold is max(θ, 0), exactly."""
        theta = jnp.maximum(jnp.reshape(buffers["threshold"], ()), 0.0)
        kept = {name: params[name] for name in ("W_enc", "W_dec", "b_dec", "b_enc")}
        return {**kept, "threshold": jnp.full((self.d_sae,), theta)}

    def default_lr(self) -> float:
        return topk_family_lr(self.d_sae)

    def batch_code(self, params, buffers, x, xw=None):
        """(f: [batch, d_sae] with k·batch active entries, x W_enc without gradient, updated buffers); xw: x W_enc
        already computed without gradient (it gets a matmul's gradient here), or None."""
        xw = x @ params["W_enc"] if xw is None else matmul_from(xw, x, params["W_enc"])
        r = jax.nn.relu(xw + encoder_bias(params, self.applies_pre_bias))
        tau = batch_threshold(jax.lax.stop_gradient(r), self.cfg.k)
        f = r * ((r >= tau) & (r > 0))
        return f, jax.lax.stop_gradient(xw), {**buffers, "threshold": self._threshold(buffers, f)}

    def _threshold(self, buffers, f):
        """θ tracks the smallest kept activation: τ itself, except when fewer than k·batch entries are
        positive (τ = 0, all positives kept), then the smallest positive one (0 if none), as in
        dictionary_learning's BatchTopK trainer."""
        return self._update(buffers, _smallest_positive(f))

    def _update(self, buffers, smallest):
        kept_min = jnp.where(jnp.isfinite(smallest), smallest, 0.0)
        return update_threshold(buffers["threshold"], kept_min, self.cfg.threshold_ema_decay)

    paths = 3  # SPARSE, SPARSE_AND_ROWS, DENSE

    def route(self, params, buffers, x):
        return self._plan(params, x)

    def _plan(self, params, x):
        """(the path: SPARSE where every row's kept entries are among its 4k candidates, SPARSE_AND_ROWS where
        at most batch/32 rows overflow them (taken in full), else DENSE; (x W_enc, the candidates' values and
        indices [batch, 4k], their `Selection`)), all without gradient."""
        xw = jax.lax.stop_gradient(x @ params["W_enc"])  # the sparse step's one dense matmul
        bias = jax.lax.stop_gradient(encoder_bias(params, self.applies_pre_bias))
        candidates, idx = top_k_of(xw, bias, min(4 * self.cfg.k, self.d_sae))  # ReLU'd, descending
        full_rows = lambda rows: jax.nn.relu(xw[rows] + bias)
        everything = lambda: kth_largest_nonnegative(jax.nn.relu(xw + bias), self.cfg.k * x.shape[0])
        chosen = select(candidates, self.cfg.k, self.d_sae, full_rows, everything)
        path = jnp.where(~jnp.any(chosen.overflow), SPARSE, jnp.where(chosen.few, SPARSE_AND_ROWS, DENSE))
        return path.astype(jnp.int32), (xw, candidates, idx, chosen)

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient, route=None) -> Forward:
        if route is None:  # outside the train step: choose here
            path, plan = self._plan(params, x)
            paths = [partial(self._forward, params, buffers, x, y, dead, plan, i) for i in range(self.paths)]
            return jax.lax.switch(path, paths)
        path, plan = route
        return self._forward(params, buffers, x, y, dead, plan, path)

    def _forward(self, params, buffers, x, y, dead, plan, path: int) -> Forward:
        xw, candidates, idx, chosen = plan
        if path == DENSE:
            f, _, buffers = self.batch_code(params, buffers, x, xw)
            x_hat, terms = self.decode_dense(params, f, y)
            counts = jnp.sum(f > 0, axis=0, dtype=jnp.int32)
            return topk_family_loss(self, params, buffers, x, y, x_hat, xw, dead, terms, counts, jnp.sum(f > 0))
        # rows within their candidates: (values, indices) with index −1 for an empty slot (the kernels skip it)
        kept = (candidates >= chosen.tau) & (candidates > 0) & ~chosen.overflow[:, None]
        idx_kept = jnp.where(kept, idx, -1)
        vals = jnp.where(kept, jax.nn.relu(selected_preacts(params, x, xw, idx_kept, self.applies_pre_bias)), 0.0)
        rows, f_rows = chosen.rows[:0], jnp.zeros((0, self.d_sae), vals.dtype)
        if path == SPARSE_AND_ROWS:  # the few overflowing rows in full: [batch/32, d_sae], encoded and decoded densely
            rows = chosen.rows
            r = jax.nn.relu(x[rows] @ params["W_enc"] + encoder_bias(params, self.applies_pre_bias))
            f_rows = jnp.where(chosen.valid[:, None] & (r >= chosen.tau) & (r > 0), r, 0.0)
        x_hat, terms = self.decode_code(params, vals, idx_kept, (rows, f_rows), y)
        smallest = jnp.minimum(_smallest_positive(vals), _smallest_positive(f_rows))
        buffers = {**buffers, "threshold": self._update(buffers, smallest)}
        counts = fire_counts_from_indices(vals, idx_kept, self.d_sae) + jnp.sum(f_rows > 0, axis=0, dtype=jnp.int32)
        n_active = jnp.sum(vals > 0) + jnp.sum(f_rows > 0)
        return topk_family_loss(self, params, buffers, x, y, x_hat, xw, dead, terms, counts, n_active)

    def decode_code(self, params, vals, idx, dense_rows, y):
        """(x̂, extra loss terms against the target y) of a sparse code: vals, idx [batch, slots] (idx −1: an
        empty slot), and dense_rows = (rows [m], f [m, d_sae]) the code of rows given in full (zeros in
        `vals` there; a row may repeat with f zero)."""
        rows, f_rows = dense_rows
        x_hat = decode_sparse(params, vals, idx)
        return (x_hat.at[rows].add(f_rows @ params["W_dec"]) if len(rows) else x_hat), {}

    def decode_dense(self, params, f, y):
        """(x̂, extra loss terms) of a dense code f [batch, d_sae]: what `decode_code` gives, densely."""
        return self.decode(params, f), {}


def _smallest_positive(f: jax.Array) -> jax.Array:
    return jnp.min(jnp.where(f > 0, jax.lax.stop_gradient(f), jnp.inf), initial=jnp.inf)


def topk_family_loss(sae, params, buffers, x, y, x_hat, xw, dead, extra_terms, fire_counts, n_active) -> Forward:
    """‖y − ŷ‖² (+ extra terms) + α·AuxK; xw = x W_enc (no gradient); n_active: the code's firing entries
    in the batch (L0 is their mean per row)."""
    mse = squared_error(y, x_hat)
    aux = auxk_loss(params, x, y, x_hat, xw, dead, sae.cfg.k_aux or sae.d_out // 2, sae.applies_pre_bias)
    loss = sum(extra_terms.values(), mse) + sae.cfg.aux_coefficient * aux
    return Forward(
        loss=loss,
        x_hat=x_hat,
        fire_counts=fire_counts,
        l0=n_active / x.shape[0],
        terms={"mse_loss": mse, "auxk_loss": aux, **extra_terms},
        buffers=buffers,
    )
