"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
Sparse Autoencoders", arXiv 2503.17547; Nabeshima 2024).

BatchTopK activations f (see `batchtopk`), and the dictionary split into nested prefixes
m₁ < m₂ < … < m_G = d_sae, each of which must reconstruct x on its own:

  loss = Σ_g ‖x − (f_{:m_g} W_dec,{:m_g} + b_dec)‖² + α L_aux

The prefix reconstructions are running sums of the groups' contributions: on the sparse path (see
`batchtopk`) each group's is a gather-sum over its own active latents, so the decoder costs one
gather-sum over the code in all (one dense matmul on the dense path). Early latents learn general
features, later ones refinements.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sae.architectures.base import gather_sum, register, squared_error
from sae.architectures.batchtopk import BatchTopK, BatchTopKConfig
from sae.errors import require


@dataclasses.dataclass
class MatryoshkaConfig(BatchTopKConfig):
    name: str = "matryoshka"
    prefixes: list[int] = dataclasses.field(default_factory=list)  # empty: d_sae/16, /8, /4, /2, d_sae

    def check(self) -> None:
        super().check()
        p = list(self.prefixes)
        require(
            all(a < b for a, b in zip([0] + p, p)) and (not p or p[-1] <= self.d_sae),
            f"sae.prefixes={p} must be strictly increasing positive sizes ≤ sae.d_sae={self.d_sae}",
        )


def prefix_sizes(prefixes: list[int] | tuple[int, ...], d_sae: int) -> tuple[int, ...]:
    """The nested prefix sizes, ending at d_sae; default (empty): d_sae/16, /8, /4, /2, d_sae."""
    sizes = tuple(prefixes) or tuple(d_sae // 2**i for i in (4, 3, 2, 1) if d_sae // 2**i > 0)
    return tuple(s for s in sizes if s < d_sae) + (d_sae,)


@register
@dataclasses.dataclass(frozen=True)
class Matryoshka(BatchTopK):
    name = "matryoshka"
    config = MatryoshkaConfig

    def _nested(self, params, y, group_decode):
        """x̂ of the whole dictionary and the smaller prefixes' summed loss; group_decode(start, end): the
        contribution of latents start..end − 1."""
        x_hat = params["b_dec"]
        prefix_losses = []
        start = 0
        for end in prefix_sizes(self.cfg.prefixes, self.d_sae):
            x_hat = x_hat + group_decode(start, end)
            prefix_losses.append(squared_error(y, x_hat))
            start = end
        # The full-dictionary term is the usual mse_loss; the smaller prefixes add their own.
        return x_hat, {"prefix_loss": sum(prefix_losses[:-1], jnp.zeros(()))}

    def decode_code(self, params, vals, idx, dense_rows, y):
        rows, f_rows = dense_rows

        def group(start, end):  # the group's own decoder rows, so each backward scatters into only those
            mine = (idx >= start) & (idx < end)
            w = params["W_dec"][start:end]
            part = gather_sum(jnp.where(mine, vals, 0.0), w, jnp.where(mine, idx - start, -1))
            return part.at[rows].add(f_rows[:, start:end] @ w) if len(rows) else part

        return self._nested(params, y, group)

    def decode_dense(self, params, f, y):
        return self._nested(params, y, lambda start, end: f[:, start:end] @ params["W_dec"][start:end])
