"""What every SAE family shares: its declaration, parameter layout, pre-bias encoder, losses.

Notation (docs/architectures.md): x: [batch, d_in]; W_enc: [d_in, d_sae]; W_dec: [d_sae, d_out]
(row i is latent i's direction); b_enc: [d_sae]; b_dec: [d_out]; f: [batch, d_sae]; ŷ = f W_dec + b_dec.

An SAE reconstructs its input (y = x, d_out = d_in). A transcoder (Dunefsky et al. 2024, arXiv 2406.11944)
is the same family trained on pairs (x, y) to predict another site y from x: every family's loss is written
against the target y, so the SAE is the case y = x, with no second code path. A transcoder never applies
the pre-bias (b_dec lives in y's space; sparsify finds that subtracting it hurts FVU even when the widths
agree), and with `skip=true` it adds a linear path x W_skip, W_skip: [d_in, d_out] initialised at zero
(Paulo et al. 2025, arXiv 2501.18823).

A family is one module: its config schema (a dataclass whose `name` defaults to the family's name), and
an `SAE` subclass registered with `@register`, whose class attributes say everything the rest of the
framework needs to know of it (its SAELens architecture, whether it encodes x − b_dec, its sparsity
coefficient, what a sweep can vary). Every table of families is derived from these (`FAMILIES`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from sae.architectures import saelens
from sae.architectures.sparse import gather_sum, take_with_sparse_grad
from sae.errors import DataError, positive, require
from sae.registry import Registry

Params = dict[str, jax.Array]


@dataclasses.dataclass
class SAEConfig:
    """The fields every family has (`sae=` group); a family's schema extends it and names itself."""

    name: str = "???"  # the family (each schema's default is its own name)
    d_sae: int = 512
    normalize_activations: bool = False  # scale inputs so E‖x‖ = √d_in (folded into weights at export)
    skip: bool = False  # a transcoder's linear skip path x W_skip (needs data.target or data.layers)
    d_out: int | None = None  # a transcoder's output width; null: the target store's (checked against it)

    def check(self) -> None:
        """Reject impossible values; ConfigError names the field."""
        positive(self.d_sae, "sae.d_sae")
        if self.d_out is not None:
            positive(self.d_out, "sae.d_out")


class Forward(NamedTuple):
    """One training forward pass.

    loss: scalar to minimise; x_hat: [batch, d_in]; fire_counts: [d_sae] int32, the tokens of
    the batch each latent is active on (feeds the dead-latent counters and the density histograms); l0: scalar,
    mean active latents per token; terms: named scalar loss terms for logging; buffers: the architecture's
    updated non-trainable state (e.g. BatchTopK's inference threshold).
    """

    loss: jax.Array
    x_hat: jax.Array
    fire_counts: jax.Array
    l0: jax.Array
    terms: dict[str, jax.Array]
    buffers: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SAE:
    """Base of every family: holds the (static) architecture config and the input width.

    Subclasses set the class attributes and implement `init_params` and `forward` (the training pass);
    they may override `inference_params`, `init_buffers`, `project_grads`, `post_update` and `default_lr`.
    Inference (`encode`) is SAELens's rule for the family's `saelens` architecture (saelens.py), so the
    exported SAE encodes exactly as the trained one.
    """

    name: ClassVar[str]  # the name used in conf/sae/<name>.yaml and `sae=<name>`
    config: ClassVar[type[SAEConfig]]  # its schema
    saelens: ClassVar[str]  # the SAELens architecture it exports as (saelens.LATENT_TENSORS)
    pre_bias: ClassVar[bool]  # encodes x − b_dec (SAELens "apply_b_dec_to_input")
    sparsity: ClassVar[str | None] = None  # the config field holding the sparsity coefficient λ, if any
    sweep: ClassVar[tuple[str, ...]] = ()  # config fields a one-pass sweep can vary (sae/training/sweep.py)
    transcodes: ClassVar[bool] = True  # can be trained as a transcoder (its loss needs no pre-bias)
    cross_layer: ClassVar[bool] = False  # reads and writes every layer: batches [batch, n_layers, d] (clt.py)

    cfg: Any
    d_in: int
    d_out: int = 0  # the target's width: d_in for an SAE (0 at construction means d_in)
    transcoder: bool = False  # trained on pairs (x, y): no pre-bias; W_skip when cfg.skip
    n_layers: int = 0  # a cross-layer family's layers (0 for the others)

    def __post_init__(self):
        if not self.d_out:
            object.__setattr__(self, "d_out", self.d_in)

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def n_latents(self) -> int:
        """Latents counted by the dead-latent and firing counters (d_sae; a CLT's n_layers · d_sae)."""
        return self.d_sae

    @property
    def applies_pre_bias(self) -> bool:
        """Whether the encoder reads x − b_dec: the family's choice for an SAE, never for a transcoder."""
        return self.pre_bias and not self.transcoder

    # --- parameters ---------------------------------------------------------------------------
    def init_params(self, key: jax.Array, b_dec: jax.Array) -> Params:
        """The family's parameters; b_dec: [d_out], the decoder bias to start from."""
        raise NotImplementedError

    def init(self, key: jax.Array, b_dec: jax.Array) -> Params:
        """init_params, plus W_skip = 0: [d_in, d_out] for a skip transcoder."""
        params = self.init_params(key, b_dec)
        if self.cfg.skip:
            params["W_skip"] = jnp.zeros((self.d_in, self.d_out))
        return params

    def init_buffers(self) -> dict[str, jax.Array]:
        return {}

    # --- inference ------------------------------------------------------------------------------
    def inference_params(self, params: Params, buffers: dict[str, jax.Array]) -> Params:
        """The SAELens tensors (saelens.tensor_shapes) of these params and buffers, and W_skip if any."""
        names = ("W_enc", "W_dec", "b_dec", *saelens.LATENT_TENSORS[self.saelens], *(("W_skip",) * self.cfg.skip))
        return {name: params[name] for name in names}

    def encode(self, params: Params, x: jax.Array, buffers: dict[str, jax.Array]) -> jax.Array:
        """x: [..., d_in] -> f: [..., d_sae] by the family's inference rule; any leading dims, a single
        vector [d_in] included. DataError naming d_in for another shape or a non-float dtype."""
        x = check_input("encode", "x", x, self.d_in, "d_in")
        k = getattr(self.cfg, "k", 0)
        f = saelens.encode(self.saelens, self.inference_params(params, buffers), rows(x), self.applies_pre_bias, k)
        return f.reshape(*x.shape[:-1], f.shape[-1])

    def decode(self, params: Params, f: jax.Array) -> jax.Array:
        """f: [..., d_sae] -> f W_dec + b_dec: [..., d_out] (a skip transcoder adds `skip(x)`). DataError naming
        d_sae for another shape or a non-float dtype."""
        f = check_input("decode", "f", f, self.d_sae, "d_sae")
        return f @ params["W_dec"] + params["b_dec"]

    def skip(self, params: Params, x: jax.Array) -> jax.Array | float:
        """x W_skip: [..., d_out] for a skip transcoder, else 0."""
        return x @ params["W_skip"] if "W_skip" in params else 0.0

    def __call__(self, params: Params, x: jax.Array, buffers: dict[str, jax.Array]) -> jax.Array:
        """x: [..., d_in] -> ŷ = decode(encode(x)) + skip(x): [..., d_out] (x̂ for an SAE)."""
        return self.decode(params, self.encode(params, x, buffers)) + self.skip(params, x)

    # --- training -------------------------------------------------------------------------------
    def forward(
        self,
        params: Params,
        buffers: dict[str, jax.Array],
        x: jax.Array,
        y: jax.Array,
        dead: jax.Array,
        sparsity_coefficient: jax.Array,
    ) -> Forward:
        """Training pass predicting the target y: [batch, d_out] (x itself for an SAE; for a skip transcoder
        the step passes y − x W_skip, so no family handles the skip path). dead: [n_latents] bool (for AuxK);
        sparsity_coefficient: warmed-up λ."""
        raise NotImplementedError

    paths = 1  # how many ways the family's step can run (see `route`)

    def route(self, params: Params, buffers: dict[str, jax.Array], x: jax.Array):
        """None, or (path: [] int32 in 0..paths − 1, plan) for a family whose step has several paths, each
        exact on the batches it is chosen for (e.g. a sparse one and a dense fallback): plan holds what they
        reuse (computed without gradient), and `forward(..., route=(path, plan))` takes the path `path` (a
        Python int). The train step chooses with `lax.switch` around the whole gradient computation, so the
        paths not taken cost nothing."""
        return None

    def project_grads(self, params: Params, grads: Params) -> Params:
        """Gradient transform before the optimiser (unit-norm families remove the radial part)."""
        return grads

    def post_update(self, params: Params) -> Params:
        """Constraint applied after the optimiser step (e.g. decoder renormalisation)."""
        return params

    def decoder_norms(self, params: Params) -> jax.Array:
        """‖W_dec[i]‖ for every latent: [n_latents] (the decoder-norm histogram)."""
        return jnp.linalg.norm(params["W_dec"].astype(jnp.float32), axis=-1)

    @property
    def sparsity_coefficient(self) -> float:
        """The λ that the warm-up schedule scales (0 for families without a penalty)."""
        return getattr(self.cfg, self.sparsity) if self.sparsity else 0.0

    def default_lr(self) -> float:
        """The learning rate when optim.lr is null."""
        return 1e-3


FAMILIES: Registry[type[SAE]] = Registry("sae", ("sae.architectures",))


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make the family `cls.name` known to `make_sae` and every table of families."""
    if cls.config.name != cls.name:
        raise ValueError(f"{cls.__name__}.config.name={cls.config.name!r}, expected the family's name {cls.name!r}")
    return FAMILIES.register(cls.name, cls)


# --- inputs ---------------------------------------------------------------------------------------


def check_input(where: str, name: str, x: Any, width: int, width_name: str) -> jax.Array:
    """x as an array of shape [..., width] and a floating-point dtype, else DataError in one line, e.g.
    "encode: x has shape (4, 7); expected (..., d_in=16)". Shapes are static: free under jax.jit."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != width:
        raise DataError(f"{where}: {name} has shape {tuple(x.shape)}; expected (..., {width_name}={width})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DataError(f"{where}: {name} has dtype {x.dtype}; expected floating point (..., {width_name}={width})")
    return x


def pair(batch: jax.Array | tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
    """A batch as (x, y): an SAE's batch is x alone (y None: the target is x itself), a transcoder's (x, y)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch, None)


def rows(x: jax.Array) -> jax.Array:
    """[..., d] as [n, d]: the 2-D layout the inference rules take."""
    return x.reshape(-1, x.shape[-1])


def make_sae(cfg: SAEConfig, d_in: int, d_out: int | None = None, n_layers: int | None = None) -> SAE:
    """The family named by cfg.name, for inputs of width d_in: an SAE, or with d_out (the target's width) a
    transcoder; with n_layers, a cross-layer one (sae=clt). Raises ConfigError for an unknown name, a config
    of another family's schema, a family that cannot transcode, skip without a target, a sae.d_out that is not
    the target's width, or layers for a per-layer family (and none for a cross-layer one)."""
    cls = FAMILIES[cfg.name]
    require(type(cfg) is cls.config, f"sae.name={cfg.name!r} needs a {cls.config.__name__}, not {type(cfg).__name__}")
    per_layer = "|".join(name for name, c in FAMILIES.items() if not c.cross_layer)
    if cls.cross_layer:
        require(
            n_layers is not None and d_out is not None,
            f"sae={cfg.name} reads every layer: give data=cached data.path=CACHE_DIR data.layers=all",
        )
    else:
        require(n_layers is None, f"data.layers is for sae=clt; sae={cfg.name} is per-layer (sae={per_layer})")
    if d_out is None:
        require(not cfg.skip, "sae.skip=true needs pairs (data.target=STORE): an SAE's skip path would learn x itself")
        require(cfg.d_out is None, f"sae.d_out={cfg.d_out} needs pairs (data.target=STORE); an SAE gives d_in")
        return cls(cfg=cfg, d_in=d_in)
    require(cls.transcodes, f"sae={cfg.name} cannot be a transcoder (it needs the pre-bias); use {_transcoding()}")
    require(
        cfg.d_out is None or cfg.d_out == d_out,
        f"sae.d_out={cfg.d_out} does not match the target's width {d_out}; drop sae.d_out or set it to {d_out}",
    )
    return cls(cfg=cfg, d_in=d_in, d_out=d_out, transcoder=True, n_layers=n_layers or 0)


def _transcoding() -> str:
    return "|".join(name for name, cls in FAMILIES.items() if cls.transcodes)


def topk_family_lr(d_sae: int) -> float:
    """Gao et al. / sparsify's rule for the TopK family: 2e-4 / √(d_sae / 2¹⁴)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


# --- initialisation ---------------------------------------------------------------------------


def random_unit_rows(key: jax.Array, n: int, d: int) -> jax.Array:
    """[n, d] rows drawn uniformly on the unit sphere."""
    w = jax.random.normal(key, (n, d))
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def tied_init(key: jax.Array, d_sae: int, d_in: int, b_dec: jax.Array, row_norm: float = 1.0) -> Params:
    """W_dec rows random with norm `row_norm`, W_enc = W_decᵀ, b_enc = 0 (Gao et al. 2024 §2.3). For a
    transcoder of another output width (b_dec: [d_out ≠ d_in]) W_enc is drawn apart, with the same norms."""
    d_out = jnp.shape(b_dec)[-1]
    w_dec = row_norm * random_unit_rows(key, d_sae, d_out)
    w_enc = w_dec.T if d_out == d_in else row_norm * random_unit_rows(jax.random.fold_in(key, 1), d_sae, d_in).T
    return {
        "W_enc": w_enc,
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


def decode_sparse(params: Params, vals: jax.Array, idx: jax.Array) -> jax.Array:
    """x̂ = Σ_j vals[:, j] W_dec[idx[:, j]] + b_dec. vals, idx: [batch, k]."""
    return gather_sum(vals, params["W_dec"], idx) + params["b_dec"]


# --- losses -------------------------------------------------------------------------------------


def squared_error(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """mean over the batch of ‖x − x̂‖² (summed over d_in), the reconstruction term of every family."""
    return jnp.mean(jnp.sum(jnp.square(x - x_hat), axis=-1))


def total_variance(a: jax.Array) -> jax.Array:
    """mean over the batch of ‖a − mean(a)‖²: a: [batch, d]."""
    return jnp.mean(jnp.sum(jnp.square(a - jnp.mean(a, axis=0)), axis=-1))


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
