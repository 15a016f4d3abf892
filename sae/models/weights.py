"""Reading a Hugging Face checkpoint directory: config.json and safetensors weights (one file or shards).

`Weights(dir)` finds each tensor through `model.safetensors` or `model.safetensors.index.json`'s weight_map
and reads it with `safetensors` directly (float32, bfloat16 or float16 on disk; cast to the dtype asked
for). A family asks for each tensor by name and shape; a missing tensor or a wrong shape is a ModelError
naming the tensor, its file and the shape expected. `RandomWeights` answers the same questions with fresh
values, so a new model (lm-train's) is built by the same code as a loaded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from sae.models.base import ModelError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint directory; ModelError when the directory or the file is not there."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"model directory '{path}' does not exist (expected a Hugging Face checkpoint folder)")
    file = path / CONFIG
    if not file.is_file():
        raise ModelError(f"'{path}' has no {CONFIG} (expected a Hugging Face checkpoint folder)")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{file} has no 'model_type' (expected a Hugging Face model config)")
    return config


class Weights:
    """The tensors of a checkpoint directory, by name, cast to `dtype` (None: as stored)."""

    def __init__(self, path: str | Path, dtype: jnp.dtype | None = jnp.float32, prefixes: tuple[str, ...] = ("",)):
        self.path, self.dtype = Path(path).expanduser(), dtype
        if (self.path / INDEX).is_file():
            try:
                weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ModelError(f"{self.path / INDEX} has no readable weight_map ({err})") from None
        elif (self.path / SINGLE).is_file():
            weight_map = {name: SINGLE for name in self._keys(SINGLE)}
        else:
            raise ModelError(f"'{self.path}' has neither {SINGLE} nor {INDEX}")
        self.files: dict[str, str] = dict(weight_map)
        for file in sorted(set(self.files.values())):
            if not (self.path / file).is_file():
                raise ModelError(f"{self.path / INDEX} names {file}, which is not in '{self.path}'")
        # Checkpoints of the same family differ in a leading module name ('transformer.h.0…' or 'h.0…').
        self.prefix = next((p for p in prefixes if any(k.startswith(p) for k in self.files)), "")

    def _keys(self, file: str) -> list[str]:
        try:
            with safe_open(self.path / file, framework="flax") as f:
                return list(f.keys())
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise ModelError(f"{self.path / file} is not a readable safetensors file ({err})") from None

    def __call__(self, name: str, shape: tuple[int, ...], init: str = "normal") -> jax.Array:
        """The tensor `name` (without the checkpoint's prefix), which must have `shape`. (`init` is for
        RandomWeights: the stored values are used here.)"""
        return self.unprefixed(self.prefix + name, shape)

    def unprefixed(self, key: str, shape: tuple[int, ...], init: str = "normal") -> jax.Array:
        """The tensor stored under exactly `key` (e.g. 'lm_head.weight', outside the base model's prefix)."""
        if key not in self.files:
            raise ModelError(f"'{self.path}' has no tensor {key!r} (expected shape {list(shape)})")
        file = self.path / self.files[key]
        try:
            with safe_open(file, framework="flax") as f:
                got = f.get_slice(key).get_shape()
                if tuple(got) != tuple(shape):
                    raise ModelError(f"{file}: tensor {key!r} has shape {list(got)}; expected {list(shape)}")
                x = f.get_tensor(key)
        except ModelError:
            raise
        except Exception as err:
            raise ModelError(f"{file}: tensor {key!r} cannot be read ({err})") from None
        return x if self.dtype is None else x.astype(self.dtype)


class RandomWeights:
    """Fresh weights for the same questions: N(0, std²) matrices, zero biases, unit norm scales."""

    def __init__(self, seed: int = 0, std: float = 0.02, dtype: jnp.dtype = jnp.float32):
        self.rng, self.std, self.dtype = np.random.default_rng(seed), std, dtype

    def unprefixed(self, key: str, shape: tuple[int, ...], init: str = "normal") -> jax.Array:
        return self(key, shape, init)

    def __call__(self, name: str, shape: tuple[int, ...], init: str = "normal") -> jax.Array:
        if init == "zeros":
            return jnp.zeros(shape, self.dtype)
        if init == "ones":
            return jnp.ones(shape, self.dtype)
        return jnp.asarray(self.rng.normal(0.0, self.std, shape), self.dtype)
