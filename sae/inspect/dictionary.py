"""The dictionary a run exported, as sae-inspect reads it: RUN/sae holds an SAE or a per-layer transcoder in
SAELens's layout (cfg.json, read by `load_sae` into a `LoadedSAE`) or a cross-layer transcoder in
circuit-tracer's (config.yaml, read by `load_clt` and seen here as a `CLTFeatures`).

`CLTFeatures` has what inspect uses of a `LoadedSAE`: with L layers of F features each it is one dictionary of
d_sae = L·F features numbered layer-major (feature j = ℓ·F + i is feature i of layer ℓ), `encode` maps rows
x [n, L, d_in] to [n, L·F], and `latent_values` gives one feature's activation on its layer's input. A TopK
rule keeps k features per layer, so the per-row floor of the statistics pass is one per (row, layer):
`topk_layers` gives (the layers, k) for either kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae.architectures import saelens
from sae.architectures.clt import CLT
from sae.errors import DataError
from sae.export import CFG_FILENAME, LoadedSAE, load_sae
from sae.export_clt import CONFIG, load_clt


@dataclasses.dataclass(frozen=True)
class CLTFeatures:
    """A cross-layer transcoder as L·F features numbered layer-major (see the module docstring).

    params: the CLT's (W_enc [L, d_in, F], b_enc [L, F], W_dec_ℓ [F, L − ℓ, d_out], …, input scale folded in);
    input_sites / output_sites: the site each layer reads and writes; config: its config.yaml.
    """

    clt: CLT
    params: dict[str, jax.Array]
    input_sites: list[str]
    output_sites: list[str]
    config: dict[str, Any]

    architecture = "clt"

    @property
    def n_layers(self) -> int:
        return self.clt.n_layers

    @property
    def features_per_layer(self) -> int:
        return self.clt.d_sae

    @property
    def d_in(self) -> int:
        return self.clt.d_in

    @property
    def d_out(self) -> int:
        return self.clt.d_out

    @property
    def d_sae(self) -> int:
        return self.clt.n_latents

    @property
    def rule(self) -> str:
        """The encoder's rule per layer: jumprelu or topk (SAELens's rules, sae/architectures/saelens.py)."""
        return self.clt.cfg.activation

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [..., L, d_in] (each layer's input) -> a: [..., L·F], feature ℓ·F + i = a_i^ℓ."""
        a = self.clt.encode(self.params, jnp.asarray(x, jnp.float32), {})
        return a.reshape(*a.shape[:-2], self.d_sae)

    def layer_of(self, features: np.ndarray) -> np.ndarray:
        """features [P] (ids 0..L·F − 1) -> the layer each belongs to [P]."""
        return np.asarray(features) // self.features_per_layer

    def latent_values(self) -> Callable:
        """jitted (params, u [P, d_in], features [P], floor [P]) -> [P]: feature features[p]'s activation on
        u[p], its layer's input (floor: TopK's per-(row, layer) floor, as for `examples.latent_values`)."""
        width, rule = self.features_per_layer, self.rule

        @jax.jit
        def values(params, u: jax.Array, features: jax.Array, floor: jax.Array) -> jax.Array:
            layer, i = features // width, features % width
            s = jnp.sum(u.astype(jnp.float32) * params["W_enc"][layer, :, i], axis=1)  # [P]
            latent = {name: params[name][layer, i] for name in saelens.LATENT_TENSORS[rule]}
            return saelens.activate(rule, s, latent, floor)

        return values

    def decoder_layer_norms(self) -> np.ndarray:
        """[L·F, L]: ‖W_dec_ℓ[i, m − ℓ]‖, feature ℓ·F + i's decoder norm into layer m (0 for m < ℓ)."""
        n, width = self.n_layers, self.features_per_layer
        out = np.zeros((n, width, n), np.float32)
        for layer in range(n):
            w = np.asarray(self.params[f"W_dec_{layer}"], np.float32)  # [F, L − ℓ, d_out]
            out[layer, :, layer:] = np.linalg.norm(w, axis=-1)
        return out.reshape(n * width, n)

    def decoder_rows(self) -> np.ndarray:
        """[L·F, L·d_out]: each feature's decoders into layers 0..L−1 side by side, zeros before its layer."""
        n, width, d = self.n_layers, self.features_per_layer, self.d_out
        out = np.zeros((n, width, n, d), np.float32)
        for layer in range(n):
            out[layer, :, layer:] = np.asarray(self.params[f"W_dec_{layer}"], np.float32)
        return out.reshape(n * width, n * d)


Dictionary = LoadedSAE | CLTFeatures


def load_dictionary(directory: str | Path) -> Dictionary:
    """RUN/sae as a LoadedSAE (cfg.json) or CLTFeatures (config.yaml). FileNotFoundError for a missing
    directory; DataError naming the directory when it holds neither file; load_sae's / load_clt's errors."""
    directory = Path(directory)
    if (directory / CFG_FILENAME).is_file() or not directory.is_dir():
        return load_sae(directory)
    if (directory / CONFIG).is_file():
        return CLTFeatures(*load_clt(directory))
    raise DataError(
        f"'{directory}' holds neither {CFG_FILENAME} (an SAE or transcoder in SAELens's layout) nor {CONFIG} "
        "(a cross-layer transcoder in circuit-tracer's layout): export the run again"
    )


def is_transcoder(sae: Dictionary) -> bool:
    """A per-layer transcoder (SAELens's transcoder architectures) or a cross-layer one."""
    return isinstance(sae, CLTFeatures) or sae.saelens_architecture in saelens.ENCODER_RULE


def topk_layers(sae: Dictionary) -> tuple[int, int]:
    """(layers the features are split in, TopK's k per layer, 0 when the rule is not TopK): (1, k) for an SAE."""
    if isinstance(sae, CLTFeatures):
        return sae.n_layers, sae.clt.cfg.k if sae.rule == "topk" else 0
    return 1, int(sae.cfg["k"]) if sae.rule == "topk" else 0


def feature_layers(sae: Dictionary, features: np.ndarray) -> np.ndarray:
    """features [P] -> each one's layer [P] (0 for every feature of an SAE or a per-layer transcoder)."""
    if isinstance(sae, CLTFeatures):
        return sae.layer_of(features)
    return np.zeros(len(features), np.int64)


def decoder_rows(sae: Dictionary) -> np.ndarray:
    """Each feature's decoder direction, the rows neighbours and ground truth compare: W_dec [d_sae, d_out], a
    CLT's `CLTFeatures.decoder_rows` [L·F, L·d_out]."""
    if isinstance(sae, CLTFeatures):
        return sae.decoder_rows()
    return np.asarray(sae.params["W_dec"])


def run_config(sae: Dictionary) -> dict:
    """The sae-train config saved with the dictionary ({} when another tool wrote it)."""
    saved = sae.config.get("sae_jax_run") if isinstance(sae, CLTFeatures) else sae.cfg.get("metadata")
    return (saved or {}).get("config") or {}


def describe(sae: Dictionary) -> str:
    """One line naming the dictionary: 'topk SAE', 'topk transcoder blocks.0.ln2.hook_normalized →
    blocks.0.hook_mlp_out', 'jumprelu cross-layer transcoder, 4 layers × 64 features: … → …'."""
    if isinstance(sae, CLTFeatures):
        sites = f"{_span(sae.input_sites)} → {_span(sae.output_sites)}"
        return f"{sae.rule} cross-layer transcoder, {sae.n_layers} layers × {sae.features_per_layer} features: {sites}"
    if not is_transcoder(sae):
        return f"{sae.architecture} SAE"
    meta, data = sae.cfg.get("metadata") or {}, run_config(sae).get("data") or {}
    site_in = meta.get("hook_name") or Path(data.get("path") or "").name
    site_out = meta.get("hook_name_out") or sae.cfg.get("hook_name_out") or Path(data.get("target") or "").name
    return f"{sae.architecture} transcoder" + (f" {site_in} → {site_out}" if site_in and site_out else "")


def _span(sites: list[str]) -> str:
    """'blocks.0.x' for one site, 'blocks.0.x … blocks.3.x' for several."""
    return sites[0] if len(sites) == 1 else f"{sites[0]} … {sites[-1]}"
