"""SAE families by the names used in conf/sae/*.yaml."""

from sae.architectures.base import SAE, Forward, Params
from sae.architectures.batchtopk import BatchTopK
from sae.architectures.gated import Gated
from sae.architectures.jumprelu import JumpReLU
from sae.architectures.matryoshka import Matryoshka
from sae.architectures.relu import ReLU
from sae.architectures.relu_april import ReLUApril
from sae.architectures.topk import TopK

REGISTRY: dict[str, type[SAE]] = {
    "relu": ReLU,
    "relu_april": ReLUApril,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
    "gated": Gated,
    "matryoshka": Matryoshka,
}


def make_sae(cfg, d_in: int) -> SAE:
    """The architecture named by cfg.name, for inputs of width d_in."""
    return REGISTRY[cfg.name](cfg=cfg, d_in=d_in)


__all__ = ["SAE", "Forward", "Params", "REGISTRY", "make_sae"]
