"""Export to, and load from, SAELens's on-disk format (`cfg.json` + `sae_weights.safetensors`).

The directory written by `export_sae` is what SAELens ≥ 6 writes with `SAE.save_model`, so
`sae_lens.SAE.load_from_disk(directory)` (and SAEBench, SAEDashboard, Neuronpedia tooling) reads it.
Tensors (float32): W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], and those of the SAELens
architecture (sae/architectures/saelens.py, which also holds the inference rules both sides use). Each
family says which architecture it exports as, whether it applies b_dec to its input, and its tensors
(`SAE.saelens`, `SAE.pre_bias`, `SAE.inference_params`).
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
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from sae.architectures import FAMILIES, SAE, saelens
from sae.architectures.base import check_input, rows
from sae.errors import DataError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
# cfg.json layout of SAELens 6: a missing or older "sae_lens_version" sends the file through SAELens's
# pre-6 converter, which keeps only a fixed list of metadata keys (ours would be dropped).
SAELENS_FORMAT_VERSION = "6.0.0"
OUR_KEY = "sae_jax"  # cfg["metadata"][OUR_KEY]: our family name, folded input scale, family config


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


def _layer_of(hook: str) -> int:
    """The block index in a hook name ('blocks.3.hook_mlp_out' → 3; 0 when it has none)."""
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else 0


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
    if FAMILIES[sae.name] is not type(sae):
        raise ValueError(f"cannot export {type(sae).__name__}: expected one of {list(FAMILIES)}")
    if sae.cross_layer:
        raise ValueError(f"{sae.name} is cross-layer: export it with export_clt (circuit-tracer's layout)")
    s = float(input_scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"input_scale={input_scale!r} must be a positive finite number")
    metadata = dict(metadata or {})
    reserved = {OUR_KEY, "sae_lens_version", "sae_lens_training_version"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved by export_sae")

    d_in, d_sae, arch = sae.d_in, sae.d_sae, sae.saelens
    try:
        p = {k: _np(v) for k, v in sae.inference_params(params, buffers).items()}
    except KeyError as missing:
        raise ValueError(f"params / buffers for {sae.name!r} lack {missing}") from None
    if arch == "jumprelu" and np.any(p["threshold"] < 0):
        # Ours gives z on (θ, 0]; SAELens's ReLU(z)·1[z > θ] cannot. Training clips θ at 0.
        raise ValueError(f"{sae.name} threshold has negative entries; SAELens needs θ ≥ 0")
    # An SAE's output is in x's (scaled) units; a transcoder's target was never scaled.
    out_scale = 1.0 if sae.transcoder else s
    tensors = {**p, "W_enc": p["W_enc"] * s, "W_dec": p["W_dec"] / out_scale, "b_dec": p["b_dec"] / out_scale}
    if "W_skip" in p:
        tensors["W_skip"] = (p["W_skip"] * s).T  # SAELens: x @ W_skipᵀ, W_skip [d_out, d_in]
    for name, shape in saelens.tensor_shapes(arch, d_in, d_sae, sae.d_out, "W_skip" in p).items():
        if tensors[name].shape != shape:
            raise ValueError(f"params[{name!r}] has shape {tensors[name].shape}; expected {shape}")

    cfg: dict[str, Any] = {
        "architecture": saelens.TRANSCODERS[arch, sae.cfg.skip] if sae.transcoder else arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.applies_pre_bias,
        "normalize_activations": "none",  # our input scale is folded into the weights
        "reshape_activations": "none",
    }
    if arch == "topk":
        cfg.update(k=int(sae.cfg.k), rescale_acts_by_decoder_norm=False)
    if sae.transcoder:  # SAELens 6 keeps d_out in the cfg, the output hook (like hook_name) in its metadata
        cfg["d_out"] = sae.d_out
        if "hook_name_out" in metadata:
            metadata["hook_layer_out"] = _layer_of(metadata["hook_name_out"])
    cfg["metadata"] = {
        **metadata,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained with SAELens
        OUR_KEY: {
            "architecture": sae.name,
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


# --- loading ---------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("arch", "pre_bias", "k"))
def _encode(params, x, arch: str, pre_bias: bool, k: int):
    return saelens.encode(arch, params, x, pre_bias, k)


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

    @property
    def d_in(self) -> int:
        return int(self.cfg["d_in"])

    @property
    def d_sae(self) -> int:
        return int(self.cfg["d_sae"])

    @property
    def d_out(self) -> int:
        """The output width: d_in for an SAE, the target's for a transcoder."""
        return int(self.cfg.get("d_out", self.cfg["d_in"]))

    @property
    def rule(self) -> str:
        """The encoder's inference rule (saelens.LATENT_TENSORS): a transcoder's is its base architecture's."""
        return saelens.ENCODER_RULE.get(self.saelens_architecture, self.saelens_architecture)

    def encode(self, x: jax.Array) -> jax.Array:
        """x: [..., d_in] (a single vector [d_in] too) -> f: [..., d_sae] by SAELens's inference rule for the
        architecture. DataError naming d_in for another shape or a non-float dtype."""
        x = jnp.asarray(check_input("encode", "x", x, self.d_in, "d_in"), jnp.float32)
        f = _encode(
            self.params,
            rows(x),
            arch=self.rule,
            pre_bias=bool(self.cfg["apply_b_dec_to_input"]),
            k=int(self.cfg.get("k", 0)),
        )
        return f.reshape(*x.shape[:-1], self.d_sae)

    def decode(self, f: jax.Array) -> jax.Array:
        """f: [..., d_sae] -> f W_dec + b_dec: [..., d_out] (a skip transcoder's __call__ adds x W_skipᵀ).
        DataError naming d_sae for another shape."""
        f = check_input("decode", "f", f, self.d_sae, "d_sae")
        return f @ self.params["W_dec"] + self.params["b_dec"]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d_in] -> x̂ (an SAE) or ŷ (a transcoder, with its skip path): [..., d_out]."""
        y = self.decode(self.encode(x))
        if "W_skip" in self.params:
            y = y + jnp.asarray(x, jnp.float32) @ self.params["W_skip"].T
        return y


def load_sae(directory: str | Path) -> LoadedSAE:
    """Read a SAELens-format directory (cfg.json + sae_weights.safetensors) into a `LoadedSAE`.

    Raises FileNotFoundError for a missing directory or file, DataError (a ValueError) naming the file for
    a truncated or damaged one (unreadable JSON or safetensors, NaN weights), ValueError for an architecture
    or option this loader does not implement, or tensors of the wrong names or shapes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: no such directory; expected one holding {CFG_FILENAME} and {WEIGHTS_FILENAME}"
        )
    cfg_path, weights_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; a SAELens SAE directory holds {CFG_FILENAME} and {WEIGHTS_FILENAME}"
            )
    cfg = _read_cfg(cfg_path)

    arch = cfg.get("architecture")
    known = sorted([*saelens.LATENT_TENSORS, *saelens.ENCODER_RULE])
    if arch not in known:
        raise ValueError(f"{cfg_path}: architecture={arch!r}; expected one of {known}")
    transcoder, skip = arch in saelens.ENCODER_RULE, "skip" in arch
    rule = saelens.ENCODER_RULE.get(arch, arch)
    if transcoder and not isinstance(cfg.get("d_out"), int):
        raise ValueError(f"{cfg_path}: d_out={cfg.get('d_out')!r}; a transcoder's cfg needs an integer d_out")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise ValueError(f"{cfg_path}: {key}={cfg.get(key)!r}; expected an integer")
    cfg.setdefault("apply_b_dec_to_input", True)  # SAELens's default
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r}; "
            "this loader expects 'none' (scaling folded into the weights)"
        )
    if rule == "topk":
        if not isinstance(cfg.get("k"), int) or not 0 < cfg["k"] <= cfg["d_sae"]:
            raise ValueError(f"{cfg_path}: k={cfg.get('k')!r}; expected an integer in 1..d_sae")
        if cfg.get("rescale_acts_by_decoder_norm", False):
            raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported")

    ours = (cfg.get("metadata") or {}).get(OUR_KEY) or {}
    family = ours.get("architecture", arch)
    if OUR_KEY in (cfg.get("metadata") or {}):
        exported = FAMILIES[family] if family in FAMILIES else None
        applies = exported is not None and exported.pre_bias and not transcoder
        if exported is None or exported.saelens != rule or applies != cfg["apply_b_dec_to_input"]:
            raise ValueError(
                f"{cfg_path}: metadata.{OUR_KEY}.architecture={family!r} does not match "
                f"architecture={arch!r}, apply_b_dec_to_input={cfg['apply_b_dec_to_input']}; "
                f"expected one of {list(FAMILIES)} exported by export_sae"
            )

    tensors = _read_weights(weights_path)
    expected = saelens.tensor_shapes(rule, cfg["d_in"], cfg["d_sae"], cfg.get("d_out"), skip)
    if set(tensors) != set(expected):
        raise ValueError(
            f"{weights_path}: tensors {sorted(tensors)}; expected {sorted(expected)} for architecture {arch!r}"
        )
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(f"{weights_path}: {name} has shape {tensors[name].shape}; expected {shape}")
    for name, tensor in tensors.items():
        if not np.all(np.isfinite(tensor)):
            raise DataError(f"{weights_path}: {name} holds NaN or infinite values; {REEXPORT}")
    params = {k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()}
    return LoadedSAE(architecture=family, params=params, cfg=cfg)


REEXPORT = "re-export the run (sae.export.export_sae, or train it again)"


def _damaged(path: Path, err: Exception) -> DataError:
    detail = str(err).splitlines()[0] if str(err) else ""
    return DataError(f"{path} is truncated or damaged ({type(err).__name__}: {detail}); {REEXPORT}")


def _read_cfg(path: Path) -> dict[str, Any]:
    """cfg.json as a dict; DataError naming the file when it is not (truncated, damaged, not JSON)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, err) from None
    if not isinstance(cfg, dict):
        raise DataError(f"{path} holds a JSON {type(cfg).__name__}, not an object; {REEXPORT}")
    return cfg


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file; DataError naming the file when it cannot be read."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from None
