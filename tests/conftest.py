"""Shared test setup: JAX's persistent compilation cache (XLA compiles dominate on 2 cores)."""

import dataclasses
import errno
import os
import tempfile

import jax
import pytest

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "sae-jax-test-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from sae.architectures import FAMILIES
from sae.config import Config, OptimConfig, TrainerConfig
from sae.data.synthetic import SyntheticConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class FamilyTest:
    """What the tests need to know of an SAE family beyond its module: the SAELens architecture and pre-bias
    its export must carry (an independent statement of its spec), whether its decoder rows stay at unit norm,
    and the fields of its test-sized runs."""

    saelens: tuple[str, bool]
    unit_norm: bool = True
    small: dict = dataclasses.field(default_factory=dict)


# One entry per family (with its NumPy reference in tests/architectures/test_architectures.py); a family
# without one fails test_every_family_has_a_test_entry.
FAMILY_TESTS = {
    "relu": FamilyTest(("standard", True)),
    "relu_april": FamilyTest(("standard", False), unit_norm=False),
    "topk": FamilyTest(("topk", True), small={"k": 3}),
    "batchtopk": FamilyTest(("jumprelu", True), small={"k": 3}),
    "jumprelu": FamilyTest(("jumprelu", False)),
    "gated": FamilyTest(("gated", True)),
    "matryoshka": FamilyTest(("jumprelu", True), small={"k": 3, "prefixes": [16, 48, 96]}),
}


def small_config(name: str, total_tokens: int = 400_000, lr: float | None = 3e-3, **sae_fields) -> Config:
    """A test-sized run: 48 ground-truth features in 24 dims, 96 latents, batch 1024."""
    sae = FAMILIES[name].config(d_sae=96, **sae_fields)
    data = SyntheticConfig(d_in=24, n_features=48, mean_active=3.0, eval_tokens=8192)
    trainer = TrainerConfig(
        total_tokens=total_tokens, batch_size=1024, log_every=50, dead_tokens=50_000, geometric_median_samples=1024
    )
    return Config(sae=sae, data=data, optim=OptimConfig(lr=lr), trainer=trainer, seed=0)


@pytest.fixture
def read_only_outputs(monkeypatch):
    """Every output directory reads as on a read-only file system: the probe of sae.outputs.check_writable
    fails with EROFS (we run as root here, so chmod would not stop a write)."""
    import sae.outputs

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(sae.outputs.tempfile, "TemporaryFile", read_only)


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


WANDB_ENV = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "WANDB_DISABLED",
    "WANDB_DIR",
    "WANDB_DATA_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "NETRC",
    "WANDB_SILENT",
)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B isolated in tmp_path: offline, no API key, no network, HOME and every W&B folder under tmp_path."""
    for key in WANDB_ENV:
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / key.lower()
        path.mkdir()
        monkeypatch.setenv(key, str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path
