"""The sparse step of a family whose code has a varying number of active latents per row (ReLU, ReLU April,
JumpReLU): `CapacityRoute`.

A latent occupies a slot of its row when s = x W_enc + slot_bias > 0 (the family says which bias: ReLU's
active latents; JumpReLU's active ones and those within its pseudo-gradient's window below θ). The route
counts each row's slots; when the widest row fits one of CAPACITIES (those below d_sae), that path takes the
row's top C slot values' indices (the kernels' top-k, with the rest marked −1: empty), and the family's
`sparse_forward` computes the loss on them alone: the decoder a gather-sum, the encoder's gradient scattered
into the slots' columns. A wider row (early in training) takes the dense path, `dense_forward`, on the
route's x W_enc. The train step runs only the chosen path (`SAE.route`); every path is exact.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from sae.architectures.sparse import top_k_of

CAPACITIES = (64, 256)  # slots per row of the sparse paths (each path compiles once)


class CapacityRoute:
    """Mixin giving `paths`, `route` and `forward` from the family's `slot_bias(params)`,
    `sparse_forward(params, buffers, x, y, coefficient, xw, idx)` (idx [batch, C], −1: empty) and
    `dense_forward(params, buffers, x, y, coefficient, xw)`; xw = x W_enc without gradient."""

    def capacities(self) -> tuple[int, ...]:
        return tuple(c for c in CAPACITIES if c < self.d_sae)

    @property
    def paths(self) -> int:
        return len(self.capacities()) + 1

    def route(self, params, buffers, x):
        return self._plan(params, x)

    def _plan(self, params, x):
        """(the first path whose capacity holds the batch's widest row, else the dense one; (x W_enc, that
        path's slot indices padded to [batch, C_max] with −1)), without gradient. The dense path skips the
        top-k."""
        caps = self.capacities()
        xw = jax.lax.stop_gradient(x @ params["W_enc"])  # the sparse step's one dense matmul
        if not caps:
            return jnp.int32(0), (xw, None)
        bias = jax.lax.stop_gradient(self.slot_bias(params))
        widest = jnp.max(jnp.sum(xw + bias > 0, axis=-1))
        path = jnp.sum(jnp.asarray(caps) < widest).astype(jnp.int32)  # the first capacity ≥ it; len(caps): dense

        def top(c):
            def fn():
                vals, idx = top_k_of(xw, bias, c)
                return jnp.pad(jnp.where(vals > 0, idx, -1), ((0, 0), (0, caps[-1] - c)), constant_values=-1)

            return fn

        empty = lambda: jnp.full((x.shape[0], caps[-1]), -1, jnp.int32)
        return path, (xw, jax.lax.switch(path, [*(top(c) for c in caps), empty]))

    def forward(self, params, buffers, x, y, dead, sparsity_coefficient, route=None):
        if route is None:  # outside the train step: choose here
            path, plan = self._plan(params, x)
            paths = [
                partial(self._forward, params, buffers, x, y, sparsity_coefficient, plan, i) for i in range(self.paths)
            ]
            return jax.lax.switch(path, paths)
        path, plan = route
        return self._forward(params, buffers, x, y, sparsity_coefficient, plan, path)

    def _forward(self, params, buffers, x, y, coefficient, plan, path: int):
        caps = self.capacities()
        xw, idx = plan
        if path == len(caps):
            return self.dense_forward(params, buffers, x, y, coefficient, xw)
        return self.sparse_forward(params, buffers, x, y, coefficient, xw, idx[:, : caps[path]])
