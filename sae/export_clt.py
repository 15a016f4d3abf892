"""Export a cross-layer transcoder to, and load it from, circuit-tracer's local layout.

circuit-tracer (`circuit_tracer.transcoder.cross_layer_transcoder.load_clt(directory)`) reads, for each
layer l of an L-layer CLT with F features per layer:

  W_enc_{l}.safetensors   W_enc_{l} [F, d_in] (rows are features), b_enc_{l} [F], b_dec_{l} [d_out],
                          threshold_{l} [F] for a JumpReLU (f = h · 1[h > θ]; without it, ReLU)
  W_dec_{l}.safetensors   W_dec_{l} [F, L − l, d_out]: feature i of layer l into layers l..L−1

and `config.yaml` names the hooks it reads and writes (`feature_input_hook`, `feature_output_hook`, bare
hook names within a block) with `model_kind: cross_layer_transcoder`. We add our own keys under `sae_jax`
(family config, activation, k, the full site names), so `load_clt` rebuilds the same CLT. Our input scale s
is folded into W_enc (W_enc·s); targets are never scaled, so the decoders are kept. circuit-tracer has no
TopK activation: a TopK CLT is written in the same layout (no threshold) and only our loader applies TopK.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from sae.architectures import make_sae
from sae.architectures.clt import CLT, CLTConfig, decoder_names
from sae.errors import DataError
from sae.export import OUR_KEY, REEXPORT, _jsonable

CONFIG = "config.yaml"


def export_clt(
    directory: str | Path,
    clt: CLT,
    params: dict[str, jax.Array],
    input_scale: float,
    input_sites: list[str],
    output_sites: list[str],
    metadata: dict | None = None,
) -> Path:
    """Write `directory/{W_enc_l, W_dec_l}.safetensors` and `config.yaml` (circuit-tracer's layout).

    input_sites / output_sites: the full site names per layer ('blocks.0.ln2.hook_normalized', …);
    metadata: JSON-serialisable extras (model_name, …) for config.yaml. Returns the directory."""
    s = float(input_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"input_scale={input_scale!r} must be a positive finite number")
    if len(input_sites) != clt.n_layers or len(output_sites) != clt.n_layers:
        raise ValueError(f"need {clt.n_layers} input and output sites; got {len(input_sites)}, {len(output_sites)}")
    p = {k: np.asarray(jax.device_get(v), np.float32) for k, v in params.items()}
    if "threshold" in p and np.any(p["threshold"] < 0):
        raise ValueError("threshold has negative entries; circuit-tracer's h · 1[h > θ] needs θ ≥ 0")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for layer, name in enumerate(decoder_names(clt.n_layers)):
        encoder = {
            f"W_enc_{layer}": np.ascontiguousarray((p["W_enc"][layer] * s).T),
            f"b_enc_{layer}": p["b_enc"][layer],
            f"b_dec_{layer}": p["b_dec"][layer],
        }
        if "threshold" in p:
            encoder[f"threshold_{layer}"] = p["threshold"][layer]
        save_file(encoder, str(directory / f"W_enc_{layer}.safetensors"))
        save_file({name: np.ascontiguousarray(p[name])}, str(directory / f"W_dec_{layer}.safetensors"))
    bare = lambda site: site.split(".", 2)[2]  # noqa: E731 - 'blocks.0.hook_mlp_out' -> 'hook_mlp_out'
    config = {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": bare(input_sites[0]),
        "feature_output_hook": bare(output_sites[0]),
        **dict(metadata or {}),
        OUR_KEY: {
            "config": _jsonable(clt.cfg),
            "n_layers": clt.n_layers,
            "d_in": clt.d_in,
            "d_out": clt.d_out,
            "input_scale": s,
            "input_scale_folded": True,
            "input_sites": list(input_sites),
            "output_sites": list(output_sites),
        },
    }
    (directory / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return directory


class LoadedCLT(NamedTuple):
    """A CLT read back: the model (`clt.encode` / `decode` / `encode_layer` / `decode_layer`), its params
    (input scale folded in: it takes raw x), the sites and config.yaml."""

    clt: CLT
    params: dict[str, jax.Array]
    input_sites: list[str]
    output_sites: list[str]
    config: dict[str, Any]


def load_clt(directory: str | Path) -> LoadedCLT:
    """Read circuit-tracer's layout written by `export_clt` (FileNotFoundError for a missing file, DataError
    naming a damaged one, ValueError for tensors of the wrong shapes)."""
    directory = Path(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a CLT directory holds {CONFIG}, W_enc_<l> and W_dec_<l>.safetensors")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        ours = config[OUR_KEY]
        n_layers, d_in, d_out = int(ours["n_layers"]), int(ours["d_in"]), int(ours["d_out"])
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        what = type(err).__name__
        raise DataError(f"{path} is damaged or was not written by export_clt ({what}); {REEXPORT}") from None
    fields = {k: v for k, v in ours["config"].items() if k in CLTConfig.__dataclass_fields__}
    clt = make_sae(CLTConfig(**fields), d_in, d_out, n_layers)
    enc = [_read(directory / f"W_enc_{layer}.safetensors") for layer in range(n_layers)]
    params = {
        "W_enc": np.stack([e[f"W_enc_{layer}"].T for layer, e in enumerate(enc)]),
        "b_enc": np.stack([e[f"b_enc_{layer}"] for layer, e in enumerate(enc)]),
        "b_dec": np.stack([e[f"b_dec_{layer}"] for layer, e in enumerate(enc)]),
    }
    if clt.cfg.activation == "jumprelu":
        params["threshold"] = np.stack([e[f"threshold_{layer}"] for layer, e in enumerate(enc)])
    for layer, name in enumerate(decoder_names(n_layers)):
        params[name] = _read(directory / f"W_dec_{layer}.safetensors")[name]
    expected = jax.eval_shape(lambda: clt.init_params(jax.random.PRNGKey(0), jnp.zeros((n_layers, d_out))))
    for name, shape in expected.items():
        if params[name].shape != shape.shape:
            raise ValueError(f"{directory}: {name} has shape {params[name].shape}; expected {shape.shape}")
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return LoadedCLT(clt, arrays, list(ours["input_sites"]), list(ours["output_sites"]), config)


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a CLT directory holds W_enc_<l> and W_dec_<l>.safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{path} is truncated or damaged ({type(err).__name__}); {REEXPORT}") from None
