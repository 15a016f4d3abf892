"""SAE families, one module each, found by `FAMILIES` (the names used in conf/sae/*.yaml)."""

from sae.architectures.base import FAMILIES, SAE, Forward, Params, SAEConfig, make_sae

__all__ = ["FAMILIES", "SAE", "Forward", "Params", "SAEConfig", "make_sae"]
