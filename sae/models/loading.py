"""`load(DIR) -> (model, tokenizer)`: a Hugging Face checkpoint directory as one of the families here."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from sae.errors import ConfigError
from sae.models.base import FAMILIES, Model, ModelError
from sae.models.tokenizer import Tokenizer
from sae.models.weights import Weights, read_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def family_of(config: dict, path: str | Path):
    try:
        return FAMILIES[config["model_type"]]
    except ConfigError:
        raise ModelError(
            f"{Path(path) / 'config.json'}: model_type={config['model_type']!r} is not supported; "
            f"supported: {list(FAMILIES)}"
        ) from None


def load_model(path: str | Path, dtype: str | None = "float32") -> Model:
    """The model of checkpoint directory `path`, its weights cast to `dtype` (None: as stored)."""
    if dtype is not None and dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r} is not one of {list(DTYPES)} (or None: as stored)")
    config = read_config(path)
    family = family_of(config, path)
    try:
        model_config = family.config(config)
    except KeyError as err:
        raise ModelError(
            f"{Path(path) / 'config.json'} has no {err.args[0]!r} (needed by {config['model_type']})"
        ) from None
    weights = Weights(path, DTYPES[dtype] if dtype else None, family.prefixes)
    return family.build(model_config, weights)


def load(path: str | Path, dtype: str | None = "float32") -> tuple[Model, Tokenizer]:
    """(model, tokenizer) of a checkpoint directory: config.json, model.safetensors (or shards with
    model.safetensors.index.json) and tokenizer.json."""
    model = load_model(path, dtype)
    return model, Tokenizer.from_dir(path, model.config.bos_token_id, model.config.eos_token_id)
