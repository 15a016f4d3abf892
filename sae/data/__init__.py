"""Activation sources for training: synthetic ground truth, a user's .npy arrays, an activation store,
a trained toy model."""

from __future__ import annotations

from collections.abc import Iterator

import jax

from sae.config import ArraysConfig, CachedConfig, SyntheticConfig, ToyRunConfig
from sae.data.arrays import ArraySource, DataError
from sae.data.cached import CachedSource
from sae.data.synthetic import SyntheticFeatures
from sae.data.toy import ToyModelSource


class SyntheticSource:
    """Training and held-out batches drawn on the device from the ground-truth features."""

    def __init__(self, cfg: SyntheticConfig, seed: int):
        key = jax.random.PRNGKey(seed)
        self.features = SyntheticFeatures.create(cfg, jax.random.fold_in(key, 0))
        self._train_key, self._eval_key, self._sample_key = (jax.random.fold_in(key, i) for i in (1, 2, 3))
        self._sample = jax.jit(self.features.sample, static_argnums=1)
        self.d_in = cfg.d_in
        self.eval_tokens = cfg.eval_tokens

    @property
    def ground_truth(self) -> jax.Array:
        """[n_features, d_in] unit directions."""
        return self.features.directions

    def sample(self, n: int, seed: int) -> jax.Array:
        return self._sample(jax.random.fold_in(self._sample_key, seed), n)

    def train_batches(self, batch_size: int, n_batches: int, seed: int, start_batch: int = 0) -> Iterator[jax.Array]:
        """Batches start_batch .. n_batches − 1 of the seed's stream (a resumed run starts past 0)."""
        key = jax.random.fold_in(self._train_key, seed)
        for i in range(start_batch, n_batches):
            yield self._sample(jax.random.fold_in(key, i), batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[jax.Array]:
        for i in range(-(-self.eval_tokens // batch_size)):
            yield self._sample(jax.random.fold_in(self._eval_key, i), batch_size)


def make_source(cfg, batch_size: int, seed: int):
    """The activation source named by the data config."""
    if isinstance(cfg, SyntheticConfig):
        return SyntheticSource(cfg, seed)
    if isinstance(cfg, ArraysConfig):
        return ArraySource(cfg, batch_size)
    if isinstance(cfg, ToyRunConfig):
        return ToyModelSource(cfg, seed)
    if isinstance(cfg, CachedConfig):
        return CachedSource(cfg, batch_size)
    raise DataError(f"data.name={cfg.name!r} is not one of ['arrays', 'cached', 'synthetic', 'toy']")


__all__ = ["ArraySource", "CachedSource", "DataError", "SyntheticFeatures", "SyntheticSource", "ToyModelSource", "make_source"]
