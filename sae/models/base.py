"""What every model family shares: the hook names, capture and replace at them, and the family config.

Sites are the TransformerLens / SAELens hook names. Block l of every family exposes, in forward order,

    blocks.{l}.hook_resid_pre        the residual stream entering the block         [batch, seq, d_model]
    blocks.{l}.hook_attn_out         what attention adds to it                      [batch, seq, d_model]
    blocks.{l}.hook_resid_mid        the stream after attention                     [batch, seq, d_model]
    blocks.{l}.ln2.hook_normalized   the MLP's input (its normalised stream)        [batch, seq, d_model]
    blocks.{l}.mlp.hook_pre          the MLP's hidden pre-activation (the gate's)   [batch, seq, d_mlp]
    blocks.{l}.mlp.hook_post         its activation (times the up projection when gated) [batch, seq, d_mlp]
    blocks.{l}.hook_mlp_out          what the MLP adds to the stream                [batch, seq, d_model]
    blocks.{l}.hook_resid_post       the stream leaving the block                   [batch, seq, d_model]

Each family's docstring says where a site sits when its layout differs (parallel residual, post-norm).
The circuits' local replacement model also reads and freezes the nonlinear parts of attention and the norms,
at sites that are not activations (FROZEN_SITES; not in `Model.sites`, not cached):

    blocks.{l}.attn.hook_pattern     attention probabilities                        [batch, heads, query, key]
    blocks.{l}.ln1.hook_scale        1 / √(var + eps) of the attention's input norm [batch, seq, 1]
    blocks.{l}.ln2.hook_scale        the same for the MLP's input norm
    blocks.{l}.ln1_post.hook_scale   Gemma 2's norms after attention and the MLP
    blocks.{l}.ln2_post.hook_scale
    ln_final.hook_scale              the final norm's scale                         [batch, seq, 1]
    hook_logits                      the logits before any final soft-cap           [batch, seq, vocab]

`model(tokens, capture=[sites])` returns (output, {site: activation}); `model(tokens, replace={site: fn})`
swaps a site's activation for fn(activation) before anything downstream reads it. Both are plain Python
inside the forward (a `Hooks` value passed down the blocks), so they trace under `jax.jit` like the rest;
under jit, whatever the returned values do not need (the logits, the blocks after the last captured site)
is dropped by the compiler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sae.errors import DataError
from sae.registry import Registry

SITE_NAMES = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
MLP_SITES = ("mlp.hook_pre", "mlp.hook_post")  # d_mlp wide; every other site is d_model wide
FROZEN_SITES = ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale", "ln1_post.hook_scale", "ln2_post.hook_scale")
FINAL_SITES = ("ln_final.hook_scale", "hook_logits")

Replace = Mapping[str, Callable[[jax.Array], jax.Array]]


class ModelError(DataError):
    """A model directory or site that cannot be used; the message names the file, tensor or field."""


def site_names(n_layers: int) -> list[str]:
    """Every site of an n_layers model in forward order: ['blocks.0.hook_resid_pre', …]."""
    return [f"blocks.{layer}.{name}" for layer in range(n_layers) for name in SITE_NAMES]


def hook_sites(n_layers: int) -> list[str]:
    """Every name `capture` and `replace` accept: the activation sites, then FROZEN_SITES per block and
    FINAL_SITES."""
    frozen = [f"blocks.{layer}.{name}" for layer in range(n_layers) for name in FROZEN_SITES]
    return [*site_names(n_layers), *frozen, *FINAL_SITES]


def site_layer(site: str) -> int:
    """The block index of a site name ('blocks.3.hook_mlp_out' → 3)."""
    return int(site.split(".")[1])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The sizes every family has, read from config.json by the family's `from_hf` (frozen: hashable, as a
    module's static data must be; subclasses are frozen dataclasses too)."""

    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab_size: int
    n_ctx: int  # positions the model was built for (max_position_embeddings / n_positions)
    causal: bool = True  # a causal LM (logits) or an encoder (hidden states)
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def first_id(value: Any) -> int | None:
    """A token id from config.json, where some checkpoints give a list (the first) or null."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model_type: how to read its config.json, how to build it from weights, and the leading module
    names its checkpoints may put before the tensor names (tried in order)."""

    config: Callable[[dict], ModelConfig]
    build: Callable[[ModelConfig, Any], Model]
    prefixes: tuple[str, ...] = ("",)


FAMILIES: Registry[Family] = Registry("model_type", ("sae.models",))


class Hooks:
    """The sites of one forward pass: applies `replace` and records `capture` (checked against `valid`)."""

    def __init__(self, valid: list[str], capture: Iterable[str] = (), replace: Replace | None = None):
        self.capture, self.replace = list(capture), dict(replace or {})
        unknown = [s for s in [*self.capture, *self.replace] if s not in valid]
        if unknown:
            last = max(site_layer(s) for s in valid if s.startswith("blocks."))
            raise ModelError(
                f"site {unknown[0]!r} is not a site of this model; sites: blocks.<0..{last}>."
                f"{{{', '.join(SITE_NAMES)}}} (and {', '.join(FROZEN_SITES + FINAL_SITES)})"
            )
        self.captured: dict[str, jax.Array] = {}

    def at(self, layer: int) -> Callable[[str, jax.Array], jax.Array]:
        """The hook of block `layer`: (bare site name, activation) -> the activation downstream reads."""
        return lambda name, x: self(f"blocks.{layer}.{name}", x)

    def __call__(self, site: str, x: jax.Array) -> jax.Array:
        if site in self.replace:
            new = jnp.asarray(self.replace[site](x))
            if new.shape != x.shape:
                raise ModelError(f"the replacement at site {site!r} has shape {new.shape}; expected {x.shape}")
            x = new.astype(x.dtype)
        if site in self.capture:
            self.captured[site] = x
        return x


class Model(nnx.Module):
    """A loaded family. `__call__(tokens [batch, seq] int, capture=(), replace=None, attention_mask=None)`
    gives logits [batch, seq, vocab] (an encoder: hidden states [batch, seq, d_model]), and with `capture`
    also {site: activation}. attention_mask [batch, seq] (1 = a real token) hides padding keys."""

    config: ModelConfig

    @property
    def sites(self) -> list[str]:
        return site_names(self.config.n_layers)

    def site_dim(self, site: str) -> int:
        """The width of a site's activation: d_mlp for mlp.hook_pre / mlp.hook_post, else d_model."""
        if site not in self.sites:
            Hooks(self.sites, [site])  # raises, naming the valid sites
        return self.config.d_mlp if site.split(".", 2)[2] in MLP_SITES else self.config.d_model

    def forward(self, tokens: jax.Array, hooks: Hooks, attention_mask: jax.Array | None) -> jax.Array:
        raise NotImplementedError  # each family defines its forward

    def __call__(
        self,
        tokens: jax.Array,
        capture: Iterable[str] = (),
        replace: Replace | None = None,
        attention_mask: jax.Array | None = None,
    ):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ModelError(f"tokens must be [batch, seq]; got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.n_ctx:
            raise ModelError(f"sequences of {tokens.shape[1]} tokens exceed the model's {self.config.n_ctx} positions")
        hooks = Hooks(hook_sites(self.config.n_layers), capture, replace)
        out = self.forward(tokens, hooks, attention_mask)
        return (out, hooks.captured) if hooks.capture else out


def jitted(model: Model, capture: Iterable[str] = (), replace: Replace | None = None):
    """A jitted pure function (tokens [batch, seq], attention_mask=None) -> what `model(tokens, capture,
    replace)` returns. The model is split once; each call merges its state inside `jax.jit`."""
    graphdef, state = nnx.split(model)
    capture = list(capture)
    Hooks(hook_sites(model.config.n_layers), capture, replace)  # bad site names fail here, not at the first call

    @jax.jit
    def run(state, tokens, attention_mask):
        return nnx.merge(graphdef, state)(tokens, capture, replace, attention_mask)

    return lambda tokens, attention_mask=None: run(state, jnp.asarray(tokens, jnp.int32), attention_mask)


def token_losses(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Next-token cross-entropy in nats, −log p(tokens[:, t+1] | ≤ t): [batch, seq − 1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def shard(model: Model, mesh: Mesh, axis: str = "model") -> Model:
    """The model with each weight matrix split over the mesh's `axis`: kernels [in, out] by output features
    (column-parallel), embeddings and the other matrices [vocab or positions, d] by their first dimension;
    the next dimension that divides when that one does not; vectors replicated. The compiler partitions the
    forward to match."""
    if axis not in mesh.shape:
        raise ModelError(f"the mesh has no axis {axis!r} (axes: {list(mesh.shape)})")
    size = mesh.shape[axis]

    def spec(path, x: jax.Array) -> NamedSharding:
        parts = [None] * x.ndim
        if x.ndim >= 2:
            kernel = any(getattr(k, "key", None) == "kernel" for k in path)
            order = (x.ndim - 1, *range(x.ndim - 1)) if kernel else range(x.ndim)
            dims = [d for d in order if x.shape[d] % size == 0]
            if dims:
                parts[dims[0]] = axis
        return NamedSharding(mesh, PartitionSpec(*parts))

    graphdef, state = nnx.split(model)
    state = jax.tree_util.tree_map_with_path(lambda path, x: jax.device_put(x, spec(path, x)), state)
    return nnx.merge(graphdef, state)
