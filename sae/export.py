"""Export to, and load from, SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`).

The directory written by `export_sae` is what SAELens ≥ 6 writes with `SAE.save_model`, so
`sae_lens.SAE.load_from_disk(directory)` (and SAEBench, SAEDashboard, Neuronpedia tooling) reads it.
Tensors (float32): W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], and per architecture

  "standard"  b_enc [d_sae]                       f = ReLU(pre)
  "topk"      b_enc [d_sae]                       f = ReLU(TopK_k(pre))                   (cfg "k")
  "jumprelu"  b_enc [d_sae], threshold [d_sae]    f = ReLU(pre) · 1[pre > threshold]
  "gated"     b_gate, r_mag, b_mag [d_sae]        f = 1[u W_enc + b_gate > 0] · ReLU(u (W_enc ⊙ exp r_mag) + b_mag)

with u = x − b_dec if cfg "apply_b_dec_to_input" else x, pre = u W_enc + b_enc, x̂ = f W_dec + b_dec.

Our families map as relu, relu_april → standard; topk → topk; jumprelu → jumprelu; batchtopk,
matryoshka → jumprelu with the scalar inference threshold broadcast to [d_sae]; gated → gated.
Our input scale s (the SAE saw x·s) is folded in so the export takes raw x and returns raw x̂:
W_enc·s, W_dec/s, b_dec/s; b_enc, b_gate, r_mag, b_mag and thresholds act on pre-activations,
which folding leaves unchanged, so they are kept. Our own fields go under cfg "metadata"["sae_jax"].
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from sae.architectures import REGISTRY, SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
# cfg.json layout of SAELens 6: a missing or older "sae_lens_version" sends the file through SAELens's
# pre-6 converter, which keeps only a fixed list of metadata keys (ours would be dropped).
SAELENS_FORMAT_VERSION = "6.0.0"
OUR_KEY = "sae_jax"  # cfg["metadata"][OUR_KEY]: our family name, folded input scale, family config

SAELENS_ARCHITECTURE = {
    "relu": "standard",
    "relu_april": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "gated": "gated",
}
# Whether the family encodes x − b_dec (SAELens "apply_b_dec_to_input").
PRE_BIAS = {
    "relu": True,
    "relu_april": False,
    "topk": True,
    "jumprelu": False,
    "batchtopk": True,
    "matryoshka": True,
    "gated": True,
}
# SAELens tensor names per architecture, beyond W_enc, W_dec, b_dec (its load_state_dict is strict).
_LATENT_TENSORS = {
    "standard": ("b_enc",),
    "topk": ("b_enc",),
    "jumprelu": ("b_enc", "threshold"),
    "gated": ("b_gate", "r_mag", "b_mag"),
}


def _family(sae: SAE) -> str:
    for name, cls in REGISTRY.items():
        if type(sae) is cls:
            return name
    raise ValueError(f"cannot export {type(sae).__name__}: expected one of {sorted(REGISTRY)}")


def _jsonable(cfg: Any) -> dict[str, Any]:
    """The family config (dataclass or OmegaConf node) as a JSON-serialisable dict."""
    if dataclasses.is_dataclass(cfg):
        out = dataclasses.asdict(cfg)
    else:
        try:
            from omegaconf import OmegaConf

            out = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - any other mapping-like config
            out = dict(vars(cfg))
    return json.loads(json.dumps(out, default=str))


def _np(a: Any) -> np.ndarray:
    return np.asarray(jax.device_get(a), dtype=np.float64)


def export_sae(
    directory: str | Path,
    sae: SAE,
    params: dict[str, jax.Array],
    buffers: dict[str, jax.Array],
    input_scale: float,
    metadata: dict | None = None,
) -> Path:
    """Write `directory/cfg.json` and `directory/sae_weights.safetensors` in SAELens's format.

    params: our parameters (trained on x·input_scale); buffers: batchtopk/matryoshka's scalar
    "threshold"; metadata: JSON-serialisable extras (e.g. model_name, hook_name, which SAELens reads
    from cfg "metadata") merged into cfg "metadata". Returns the directory.
    """
    family = _family(sae)
    s = float(input_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"input_scale={input_scale!r} must be a positive finite number")
    metadata = dict(metadata or {})
    reserved = {OUR_KEY, "sae_lens_version", "sae_lens_training_version"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved by export_sae")

    d_in, d_sae = sae.d_in, sae.d_sae
    arch = SAELENS_ARCHITECTURE[family]
    needed = ("W_enc", "W_dec", "b_dec") + (
        ("b_gate", "r_mag", "b_mag") if family == "gated" else ("b_enc",)
    ) + (("threshold",) if family == "jumprelu" else ())
    missing = [k for k in needed if k not in params]
    if missing:
        raise ValueError(f"params for {family!r} lack {missing}; expected {list(needed)}")
    p = {k: _np(params[k]) for k in needed}

    tensors = {
        "W_enc": p["W_enc"] * s,
        "W_dec": p["W_dec"] / s,
        "b_dec": p["b_dec"] / s,
    }
    if family == "gated":
        tensors.update(b_gate=p["b_gate"], r_mag=p["r_mag"], b_mag=p["b_mag"])
    else:
        tensors["b_enc"] = p["b_enc"]
    if family == "jumprelu":
        if np.any(p["threshold"] < 0):
            # Ours gives z on (θ, 0]; SAELens's ReLU(z)·1[z > θ] cannot. Training clips θ at 0.
            raise ValueError("jumprelu params['threshold'] has negative entries; SAELens needs θ ≥ 0")
        tensors["threshold"] = p["threshold"]
    elif family in ("batchtopk", "matryoshka"):
        if "threshold" not in buffers:
            raise ValueError(f"buffers for {family!r} lack the scalar 'threshold'")
        theta = float(np.asarray(jax.device_get(buffers["threshold"])).reshape(()))
        # r·1[r > θ] with r = ReLU(z) equals ReLU(z)·1[z > θ] for θ ≥ 0, and ReLU(z) for θ < 0
        # (the unset sentinel), which is θ = 0; so the clamp is exact.
        tensors["threshold"] = np.full((d_sae,), max(theta, 0.0))

    expected = _expected_shapes(arch, d_in, d_sae)
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"params[{name!r}] has shape {tensors[name].shape}; expected {shape}")

    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": PRE_BIAS[family],
        "normalize_activations": "none",  # our input scale is folded into the weights
        "reshape_activations": "none",
    }
    if arch == "topk":
        cfg.update(k=int(sae.cfg.k), rescale_acts_by_decoder_norm=False)
    cfg["metadata"] = {
        **metadata,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained with SAELens
        OUR_KEY: {
            "architecture": family,
            "input_scale": s,
            "input_scale_folded": True,
            "config": _jsonable(sae.cfg),
        },
    }

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(directory / WEIGHTS_FILENAME),
        metadata={"format": "pt"},
    )
    (directory / CFG_FILENAME).write_text(json.dumps(cfg, indent=2))
    return directory


def _expected_shapes(arch: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes.update({name: (d_sae,) for name in _LATENT_TENSORS[arch]})
    return shapes


# --- loading ---------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("arch", "pre_bias", "k"))
def _encode(params, x, arch: str, pre_bias: bool, k: int):
    u = x - params["b_dec"] if pre_bias else x
    if arch == "gated":
        gate = u @ params["W_enc"] + params["b_gate"]
        mag = u @ (params["W_enc"] * jnp.exp(params["r_mag"])) + params["b_mag"]
        return (gate > 0).astype(x.dtype) * jax.nn.relu(mag)
    pre = u @ params["W_enc"] + params["b_enc"]
    if arch == "standard":
        return jax.nn.relu(pre)
    if arch == "jumprelu":
        return jax.nn.relu(pre) * (pre > params["threshold"]).astype(x.dtype)
    # topk: the k largest pre-activations per row, then ReLU
    vals, idx = jax.lax.top_k(pre, k)
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, idx].set(jax.nn.relu(vals))


@dataclasses.dataclass(frozen=True)
class LoadedSAE:
    """An exported SAE, ready for inference on raw inputs (input scale already folded in).

    architecture: our family name (the SAELens name if the file was not written by `export_sae`);
    params: jax arrays by SAELens names; cfg: the parsed cfg.json.
    """

    architecture: str
    params: dict[str, jax.Array]
    cfg: dict[str, Any]

    @property
    def saelens_architecture(self) -> str:
        return self.cfg["architecture"]

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [batch, d_in] -> f: [batch, d_sae] by SAELens's inference rule for the architecture."""
        x = jnp.asarray(x, jnp.float32)
        return _encode(
            self.params, x, arch=self.saelens_architecture,
            pre_bias=bool(self.cfg["apply_b_dec_to_input"]), k=int(self.cfg.get("k", 0)),
        )

    def decode(self, f: jax.Array) -> jax.Array:
        """f: [batch, d_sae] -> x̂ = f W_dec + b_dec: [batch, d_in]."""
        return f @ self.params["W_dec"] + self.params["b_dec"]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, d_in] -> x̂: [batch, d_in]."""
        return self.decode(self.encode(x))


def load_sae(directory: str | Path) -> LoadedSAE:
    """Read a SAELens-format directory (cfg.json + sae_weights.safetensors) into a `LoadedSAE`.

    Raises FileNotFoundError for a missing directory or file, ValueError for an architecture or
    option this loader does not implement, or tensors of the wrong names or shapes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory; expected one holding "
                                f"{CFG_FILENAME} and {WEIGHTS_FILENAME}")
    cfg_path, weights_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a SAELens SAE directory holds "
                                    f"{CFG_FILENAME} and {WEIGHTS_FILENAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e

    arch = cfg.get("architecture")
    if arch not in _LATENT_TENSORS:
        raise ValueError(f"{cfg_path}: architecture={arch!r}; expected one of {sorted(_LATENT_TENSORS)}")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{cfg_path}: {key}={cfg.get(key)!r}; expected an integer")
    cfg.setdefault("apply_b_dec_to_input", True)  # SAELens's default
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r}; "
                         "this loader expects 'none' (scaling folded into the weights)")
    if arch == "topk":
        if not isinstance(cfg.get("k"), int) or not 0 < cfg["k"] <= cfg["d_sae"]:
            raise ValueError(f"{cfg_path}: k={cfg.get('k')!r}; expected an integer in 1..d_sae")
        if cfg.get("rescale_acts_by_decoder_norm", False):
            raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")

    ours = (cfg.get("metadata") or {}).get(OUR_KEY) or {}
    family = ours.get("architecture", arch)
    if OUR_KEY in (cfg.get("metadata") or {}):
        if SAELENS_ARCHITECTURE.get(family) != arch or PRE_BIAS[family] != cfg["apply_b_dec_to_input"]:
            raise ValueError(f"{cfg_path}: metadata.{OUR_KEY}.architecture={family!r} does not match "
                             f"architecture={arch!r}, apply_b_dec_to_input={cfg['apply_b_dec_to_input']}; "
                             f"expected one of {sorted(SAELENS_ARCHITECTURE)} exported by export_sae")

    tensors = load_file(str(weights_path))
    expected = _expected_shapes(arch, cfg["d_in"], cfg["d_sae"])
    if set(tensors) != set(expected):
        raise ValueError(f"{weights_path}: tensors {sorted(tensors)}; expected {sorted(expected)} "
                         f"for architecture {arch!r}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{weights_path}: {name} has shape {tensors[name].shape}; expected {shape}")
    params = {k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()}
    return LoadedSAE(architecture=family, params=params, cfg=cfg)
