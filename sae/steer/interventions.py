"""Interventions at a site as data: add α·v, or clamp / scale / ablate an SAE feature with the error term kept.

An intervention names a site, the positions it acts on ([seq] bool; None: all) and what it does to the
activation x [batch, seq, d] there, with α its strength:

    Add(site, v)                 x' = x + α v                                   (activation steering, CAA)
    Feature(site, sae, i, op)    f = encode(x);  x' = x + (f'_i − f_i) d_i,     d_i = W_dec[i]
        op "clamp": f'_i = α;  "scale": f'_i = α f_i;  "ablate": f'_i = 0 (α unused)

The feature form is the SAE splice with its error term kept, decode(f') + (x − decode(f)), written so that
it is exact: an unchanged feature gives x itself, and ablating feature i moves the site by −f_i d_i
(SAELens `HookedSAETransformer`, `use_error_term=True`). Several interventions at one site act on the same
x (one encoding). Strengths are a [n] array argument of the compiled functions, one per intervention, so
sweeping α never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae.export import LoadedSAE
from sae.models.base import Model, ModelError, Replace
from sae.models.generate import sampler as plain_sampler

OPS = ("clamp", "scale", "ablate")


@dataclasses.dataclass(frozen=True, eq=False)
class Add:
    """x' = x + α v at `site`; v: [d]."""

    site: str
    vector: np.ndarray
    positions: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Feature:
    """Feature i of `sae` (trained at `site`) clamped to α, scaled by α or ablated, the error term kept."""

    site: str
    sae: LoadedSAE
    feature: int
    op: str = "clamp"
    positions: np.ndarray | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ModelError(f"feature op {self.op!r} is not one of {list(OPS)}")
        if not 0 <= self.feature < self.sae.d_sae:
            raise ModelError(f"feature {self.feature} is out of range: the SAE has {self.sae.d_sae} features")


Intervention = Add | Feature


def _mask(positions: np.ndarray | None, seq: int) -> jax.Array | None:
    """[seq] bool of the positions acted on (None: all); a mask longer than the text is cut to it."""
    return None if positions is None else jnp.asarray(positions, bool)[:seq]


def _edit(items: list[tuple[Intervention, int]], strengths: jax.Array):
    """fn(x [batch, seq, d]) -> x' for the interventions at one site (with their indices into strengths)."""

    def fn(x: jax.Array) -> jax.Array:
        delta = jnp.zeros_like(x)
        codes: dict[int, jax.Array] = {}
        for item, j in items:
            alpha = strengths[j].astype(x.dtype)
            if isinstance(item, Add):
                change = alpha * jnp.asarray(item.vector, x.dtype)[None, None, :]
            else:
                sae = item.sae
                if id(sae) not in codes:
                    codes[id(sae)] = sae.encode(x.reshape(-1, x.shape[-1]).astype(jnp.float32)).reshape(
                        *x.shape[:2], -1
                    )
                f = codes[id(sae)][..., item.feature]
                new = {"clamp": jnp.broadcast_to(alpha, f.shape), "scale": alpha * f, "ablate": jnp.zeros_like(f)}
                change = (new[item.op] - f)[..., None].astype(x.dtype) * sae.params["W_dec"][item.feature].astype(
                    x.dtype
                )
            where = _mask(item.positions, x.shape[1])
            delta = delta + (change if where is None else jnp.where(where[None, :, None], change, 0))
        return x + delta

    return fn


def replacements(interventions: Sequence[Intervention], strengths: jax.Array, model: Model | None = None) -> Replace:
    """The `replace` dict that applies `interventions` with `strengths` [n] (traced or concrete)."""
    by_site: dict[str, list[tuple[Intervention, int]]] = {}
    for j, item in enumerate(interventions):
        if model is not None:
            dim = model.site_dim(item.site)  # raises, naming the sites, for one the model lacks
            width = item.vector.shape[-1] if isinstance(item, Add) else item.sae.d_in
            if width != dim:
                raise ModelError(f"an intervention at {item.site!r} has width {width}; the site has {dim}")
        by_site.setdefault(item.site, []).append((item, j))
    return {site: _edit(items, strengths) for site, items in by_site.items()}


def steered(model: Model, interventions: Sequence[Intervention], capture: Sequence[str] = ()):
    """A jitted (tokens [batch, seq], strengths [n]) -> logits (with `capture`: (logits, {site: act})) with
    the interventions applied; strengths are traced, so new values never recompile."""
    interventions = list(interventions)
    replacements(interventions, jnp.zeros(len(interventions)), model)  # bad sites and widths fail here
    graphdef, state = nnx.split(model)
    capture = list(capture)

    @jax.jit
    def run(state, tokens, strengths):
        return nnx.merge(graphdef, state)(tokens, capture, replacements(interventions, strengths))

    def call(tokens, strengths=None):
        s = jnp.zeros(len(interventions)) if strengths is None else jnp.asarray(strengths, jnp.float32)
        if s.shape != (len(interventions),):
            raise ModelError(f"strengths have shape {tuple(s.shape)}; expected ({len(interventions)},)")
        return run(state, jnp.asarray(tokens, jnp.int32), s)

    call.jitted = run
    return call


def positions(kind: str | Sequence[int], n_prompt: int, n_ctx: int) -> np.ndarray | None:
    """The [n_ctx] mask of a generation's positions: "all" (None), "prompt" (its first n_prompt), "generated"
    (the rest), or a list of indices. Masks index the n_ctx window, which slides once the text outgrows it."""
    if isinstance(kind, str):
        if kind == "all":
            return None
        if kind not in ("prompt", "generated"):
            raise ModelError(f"positions={kind!r}: expected 'all', 'prompt', 'generated' or a list of indices")
        mask = np.arange(n_ctx) < n_prompt
        return mask if kind == "prompt" else ~mask
    index = np.asarray(list(kind), int)
    if index.size and not (0 <= index.min() and index.max() < n_ctx):
        raise ModelError(f"positions {index.tolist()} fall outside the model's context 0..{n_ctx - 1}")
    mask = np.zeros(n_ctx, bool)
    mask[index] = True
    return mask


def sampler(model: Model, interventions: Sequence[Intervention] = ()):
    """fn(prompt, n_tokens, strengths=None, temperature=0.0, seed=0) -> token ids: `sae.models.generate`'s
    sampler with the interventions applied at every step, compiled once for all strengths, temperatures and
    seeds (keep it to generate repeatedly)."""
    interventions = list(interventions)
    replacements(interventions, jnp.zeros(len(interventions)), model)  # bad sites and widths fail here
    run = plain_sampler(model, lambda a: replacements(interventions, a))

    def call(prompt, n_tokens, strengths=None, temperature: float = 0.0, seed: int = 0) -> list[int]:
        s = jnp.zeros(len(interventions)) if strengths is None else jnp.asarray(strengths, jnp.float32)
        if s.shape != (len(interventions),):
            raise ModelError(f"strengths have shape {tuple(s.shape)}; expected ({len(interventions)},)")
        return run(prompt, n_tokens, temperature, seed, s)

    call.jitted = run.jitted
    return call


def generate(
    model: Model,
    prompt: list[int],
    n_tokens: int,
    interventions: Sequence[Intervention] = (),
    strengths=None,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int]:
    """n_tokens continuing `prompt` with the interventions applied at every step (one `sampler`)."""
    return sampler(model, interventions)(prompt, n_tokens, strengths, temperature, seed)
