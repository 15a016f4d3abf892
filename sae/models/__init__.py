"""Hugging Face model families in flax.nnx with the TransformerLens hook names (base.py): gpt2, llama
(Llama 2/3, Mistral, Qwen2), gpt_neox (Pythia), gemma2 and bert, each registered in its own module."""

from sae.models.base import FAMILIES, Model, ModelError, jitted, shard, site_names, token_losses
from sae.models.loading import load, load_model
from sae.models.tokenizer import Tokenizer

__all__ = [
    "FAMILIES",
    "Model",
    "ModelError",
    "Tokenizer",
    "jitted",
    "load",
    "load_model",
    "shard",
    "site_names",
    "token_losses",
]
