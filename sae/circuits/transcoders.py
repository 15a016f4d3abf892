"""A cross-layer transcoder or a stack of per-layer transcoders, seen the one way attribution needs.

With L layers of F features each, layer ℓ's features read x^ℓ (the site `input_sites[ℓ]`, the MLP's input)
and write into the MLP outputs (`output_sites`) of layers ℓ … ℓ + n_ℓ − 1:

    h^ℓ = x^ℓ W_enc^ℓ + b_enc^ℓ                       W_enc [L, d_in, F], b_enc [L, F] (input scale folded in)
    a^ℓ = σ(h^ℓ)                                     σ: jumprelu (θ [L, F]), topk (k per token) or relu
    ŷ^m = Σ_ℓ a^ℓ W_dec_ℓ[:, m − ℓ] + b_dec^m + x^m W_skip^m      W_dec_ℓ [F, n_ℓ, d_out]

A CLT (Ameisen et al. 2025) has n_ℓ = L − ℓ; per-layer transcoders (Dunefsky et al. 2024) n_ℓ = 1, and a skip
transcoder (Paulo et al. 2025) its W_skip. `load_transcoders` reads either from sae-train runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from sae.errors import DataError
from sae.inspect.dictionary import CLTFeatures, is_transcoder, load_dictionary
from sae.models.base import Model, site_layer

RULES = ("jumprelu", "topk", "relu")


@dataclasses.dataclass(frozen=True, eq=False)
class Transcoders:
    W_enc: jax.Array  # [L, d_in, F]
    b_enc: jax.Array  # [L, F]
    W_dec: tuple[jax.Array, ...]  # per source layer ℓ: [F, n_ℓ, d_out]
    b_dec: jax.Array  # [L, d_out]
    rule: str  # jumprelu | topk | relu
    threshold: jax.Array | None  # [L, F] (jumprelu)
    k: int  # topk
    W_skip: jax.Array | None  # [L, d_in, d_out] (skip transcoders)
    input_sites: tuple[str, ...]
    output_sites: tuple[str, ...]
    names: tuple[str, ...]  # the run directories, one (a CLT) or one per layer

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_features(self) -> int:
        """F, the features per layer."""
        return self.W_enc.shape[2]

    @property
    def kind(self) -> str:
        """circuit-tracer's feature_type for the graph's feature nodes."""
        return "cross layer transcoder" if len(self.names) == 1 else "transcoder"

    def preacts(self, layer: int, x: jax.Array) -> jax.Array:
        """h^ℓ: x [..., d_in] -> [..., F]."""
        return x @ self.W_enc[layer] + self.b_enc[layer]

    def activate(self, layer: int, h: jax.Array) -> jax.Array:
        """a^ℓ = σ(h^ℓ) over the last axis: [..., F] -> [..., F]."""
        if self.rule == "topk":
            kth = jax.lax.top_k(h, self.k)[0][..., -1:]
            return jnp.where(h >= kth, jax.nn.relu(h), 0.0)
        if self.rule == "jumprelu":
            return jnp.where(h > self.threshold[layer], jax.nn.relu(h), 0.0)
        return jax.nn.relu(h)

    def decode_into(self, layer: int, acts: list[jax.Array]) -> jax.Array:
        """Σ_ℓ a^ℓ W_dec_ℓ[:, m − ℓ] for m = layer, over the sources ℓ ≤ m that write to it: acts [..., F] of
        layers 0..m -> [..., d_out] (no b_dec, no skip)."""
        out = 0.0
        for source, a in enumerate(acts[: layer + 1]):
            if layer - source < self.W_dec[source].shape[1]:
                out = out + a @ self.W_dec[source][:, layer - source]
        return out

    def skip(self, layer: int, x: jax.Array) -> jax.Array | float:
        return 0.0 if self.W_skip is None else x @ self.W_skip[layer]

    def decoder_vectors(self, layer: int, features: jax.Array) -> jax.Array:
        """The decoders of features [n] of `layer` into every layer: [n, L, d_out] (zeros where it does not write)."""
        w = self.W_dec[layer][features]  # [n, n_ℓ, d_out]
        return jnp.zeros((len(features), self.n_layers, w.shape[2]), w.dtype).at[:, layer : layer + w.shape[1]].set(w)

    def check(self, model: Model) -> None:
        """DataError naming the mismatch when these transcoders do not belong to `model`'s MLPs."""
        c = model.config
        if not c.causal:
            raise DataError(f"attribution needs a causal LM; the model is {c.model_type} (an encoder)")
        if self.n_layers != c.n_layers:
            raise DataError(f"{self.names[0]}: transcoders for {self.n_layers} layers; the model has {c.n_layers}")
        for layer, (x, y) in enumerate(zip(self.input_sites, self.output_sites)):
            want = (f"blocks.{layer}.", f"blocks.{layer}.hook_mlp_out")
            if not x.startswith(want[0]) or x.split(".", 2)[2] not in ("ln2.hook_normalized", "hook_resid_mid"):
                raise DataError(
                    f"{self._name(layer)}: layer {layer} reads {x!r}; attribution needs the MLP's input "
                    f"({want[0]}ln2.hook_normalized or {want[0]}hook_resid_mid)"
                )
            if y != want[1]:
                raise DataError(f"{self._name(layer)}: layer {layer} writes {y!r}; attribution needs {want[1]!r}")
        width = {"d_in": self.W_enc.shape[1], "d_out": self.b_dec.shape[1]}
        for name, d in width.items():
            if d != c.d_model:
                raise DataError(f"{self.names[0]}: {name}={d}, but the model's d_model is {c.d_model}")

    def _name(self, layer: int) -> str:
        return self.names[layer] if len(self.names) > 1 else self.names[0]


jax.tree_util.register_dataclass(
    Transcoders,
    data_fields=["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"],
    meta_fields=["rule", "k", "input_sites", "output_sites", "names"],
)


def load_transcoders(runs: str | Path | list) -> Transcoders:
    """A CLT run (RUN or RUN/sae holding config.yaml) or a list of per-layer transcoder runs, layer 0 first.
    DataError naming the run that is not a transcoder, whose layer or sites do not line up, or whose rule
    attribution cannot linearise (gated)."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    loaded = [(str(run), load_dictionary(sae_dir(Path(run)))) for run in runs]
    if len(loaded) == 1 and isinstance(loaded[0][1], CLTFeatures):
        return _from_clt(*loaded[0])
    for name, d in loaded:
        if isinstance(d, CLTFeatures):
            raise DataError(f"{name} is a cross-layer transcoder: give it alone, not in a list of per-layer ones")
        if not is_transcoder(d):
            raise DataError(f"{name} is an SAE ({d.architecture}), not a transcoder: attribution needs MLP transcoders")
    return _from_layers(loaded)


def sae_dir(run: Path) -> Path:
    """RUN/sae where a run holds one (sae-train output), else RUN itself (an exported dictionary)."""
    return run / "sae" if (run / "sae").is_dir() else run


def _check_rule(name: str, rule: str) -> str:
    if rule not in RULES:
        raise DataError(f"{name}: a {rule} encoder is not σ(x W_enc + b_enc); attribution supports {list(RULES)}")
    return rule


def _from_clt(name: str, d: CLTFeatures) -> Transcoders:
    p, n = d.params, d.n_layers
    rule = _check_rule(name, d.rule)
    return Transcoders(
        W_enc=p["W_enc"],
        b_enc=p["b_enc"],
        W_dec=tuple(p[f"W_dec_{layer}"] for layer in range(n)),
        b_dec=p["b_dec"],
        rule=rule,
        threshold=p.get("threshold"),
        k=d.clt.cfg.k,
        W_skip=None,
        input_sites=tuple(d.input_sites),
        output_sites=tuple(d.output_sites),
        names=(name,),
    )


def _from_layers(loaded: list) -> Transcoders:
    sites = []
    for layer, (name, d) in enumerate(loaded):
        meta = d.cfg.get("metadata") or {}
        x, y = meta.get("hook_name"), meta.get("hook_name_out")
        if not x or not y:
            raise DataError(f"{name}: its cfg.json names no hook_name / hook_name_out; export it from a cached store")
        if site_layer(x) != layer:
            raise DataError(f"{name} is given as layer {layer}'s transcoder but reads {x!r}")
        sites.append((x, y))
    names = [n for n, _ in loaded]
    rules = {_check_rule(n, d.rule) for n, d in loaded}
    if len(rules) > 1:
        raise DataError(f"the transcoders mix encoder rules {sorted(rules)}; give one rule for every layer")
    widths = {d.d_sae for _, d in loaded}
    if len(widths) > 1:
        raise DataError(f"the transcoders have different widths {sorted(widths)}; attribution needs one F per layer")
    ks = {int(d.cfg.get("k", 0)) for _, d in loaded}
    if len(ks) > 1:
        raise DataError(f"the transcoders have different k {sorted(ks)}; give one k for every layer")
    params = [d.params for _, d in loaded]
    pre_bias = [bool(d.cfg.get("apply_b_dec_to_input")) for _, d in loaded]
    b_enc = [p["b_enc"] - (p["b_dec"] @ p["W_enc"] if pb else 0.0) for p, pb in zip(params, pre_bias)]
    skips = ["W_skip" in p for p in params]
    if any(skips) and not all(skips):
        raise DataError("some transcoders have a skip path (W_skip) and some do not; give one kind for every layer")
    rule = rules.pop()
    return Transcoders(
        W_enc=jnp.stack([p["W_enc"] for p in params]),
        b_enc=jnp.stack(b_enc),
        W_dec=tuple(p["W_dec"][:, None] for p in params),
        b_dec=jnp.stack([p["b_dec"] for p in params]),
        rule=rule,
        threshold=jnp.stack([p["threshold"] for p in params]) if rule == "jumprelu" else None,
        k=ks.pop(),
        W_skip=jnp.stack([p["W_skip"].T for p in params]) if all(skips) else None,
        input_sites=tuple(x for x, _ in sites),
        output_sites=tuple(y for _, y in sites),
        names=tuple(names),
    )


def random_transcoders(
    config,
    n_features: int,
    rule: str = "topk",
    k: int = 16,
    cross_layer: bool = True,
    skip: bool = False,
    seed: int = 0,
    out_norm: float = 1.0,
) -> Transcoders:
    """Transcoders of random weights for a model config (tests and benchmarks): each layer ℓ reads
    blocks.ℓ.ln2.hook_normalized and writes blocks.ℓ.hook_mlp_out; a CLT when cross_layer, else one per
    layer; JumpReLU thresholds 0.5; encoder columns of norm about 1, decoder rows, b_dec and the skip's
    outputs of about `out_norm` (a model's MLP outputs' size keeps the error terms as small as the model's)."""
    n, d = config.n_layers, config.d_model
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 3 * n + 3))

    def normal(shape, scale):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    spans = [n - layer if cross_layer else 1 for layer in range(n)]
    return Transcoders(
        W_enc=normal((n, d, n_features), d**-0.5),
        b_enc=normal((n, n_features), 0.1),
        W_dec=tuple(normal((n_features, span, d), out_norm * d**-0.5) for span in spans),
        b_dec=normal((n, d), 0.1 * out_norm * d**-0.5),
        rule=_check_rule("random transcoders", rule),
        threshold=jnp.full((n, n_features), 0.5) if rule == "jumprelu" else None,
        k=k,
        W_skip=normal((n, d, d), 0.5 * out_norm / d) if skip else None,
        input_sites=tuple(f"blocks.{layer}.ln2.hook_normalized" for layer in range(n)),
        output_sites=tuple(f"blocks.{layer}.hook_mlp_out" for layer in range(n)),
        names=("random clt",) if cross_layer else tuple(f"random transcoder {layer}" for layer in range(n)),
    )
