"""Synthetic activations with known ground-truth features, generated on the device from the seed.

x = Σ_i c_i d_i + noise, with d_i ∈ ℝ^{d_in} (i < n_features) random unit directions and sparse
non-negative coefficients: feature i fires with probability p_i ∝ (i + 1)^(−decay), scaled so that
Σ_i p_i = mean_active, and then has magnitude |N(magnitude_mean, magnitude_std)|. Optional groups of
features fire together: within a group a member reuses the group's uniform draw with probability
`group_correlation` (a shared threshold variable, so marginal probabilities are unchanged).

The uniforms come from `toy_models.data.counter_uniform`, a keyed integer hash of (key, element), not
from JAX's threefry: at the default size a batch takes 6 ms instead of 16 ms on a 2-core CPU, where it
cost more than the SAE step it feeds. One uniform decides whether a feature fires, an independent one
gives its magnitude through the normal's inverse CDF.

With d_out set the source gives transcoder pairs (x, y): y = Σ_i c_i v_i + noise', with the same
coefficients c, v_i ∈ ℝ^{d_out} independent random unit directions and noise' independent of x's noise
(both of std noise_std). A decoder should recover the v_i, an encoder the d_i.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from sae.architectures.base import random_unit_rows
from sae.data.generated import block_chunks, block_rows
from sae.data.sources import BATCH_SOURCES, ROW_SOURCES, Batch, BatchSourceEntry, Chunk, DataConfig, RowSourceEntry
from sae.errors import fraction, positive, require
from toy_models.data import counter_uniform


@dataclasses.dataclass
class SyntheticConfig(DataConfig):
    """`data=synthetic`: sparse non-negative combinations of ground-truth unit directions."""

    name: str = "synthetic"
    d_in: int = 64
    n_features: int = 256
    mean_active: float = 6.0  # expected number of active features per token
    probability_decay: float = 0.5  # feature i fires with probability ∝ (i + 1)^(−decay)
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.25
    n_correlated_groups: int = 0
    group_size: int = 4
    group_correlation: float = 0.0  # 0..1: how often a group's members fire together
    noise_std: float = 0.0
    d_out: int | None = None  # set: pairs (x, y) with y = c · v + noise' (a transcoder's data); null: x alone

    group_key = "data"  # the config key in messages (`source` for sae-cache)

    def check(self) -> None:
        super().check()
        g = self.group_key
        positive(self.d_in, f"{g}.d_in")
        positive(self.n_features, f"{g}.n_features")
        if self.d_out is not None:
            positive(self.d_out, f"{g}.d_out")
        require(
            0 < self.mean_active <= self.n_features,
            f"{g}.mean_active={self.mean_active} must be in (0, {g}.n_features={self.n_features}]",
        )
        require(self.probability_decay >= 0, f"{g}.probability_decay={self.probability_decay} must be ≥ 0")
        require(self.magnitude_std >= 0, f"{g}.magnitude_std={self.magnitude_std} must be ≥ 0")
        require(self.noise_std >= 0, f"{g}.noise_std={self.noise_std} must be ≥ 0")
        fraction(self.group_correlation, f"{g}.group_correlation")
        require(
            self.n_correlated_groups >= 0
            and self.group_size > 0
            and self.n_correlated_groups * self.group_size <= self.n_features,
            f"{g}.n_correlated_groups={self.n_correlated_groups} × {g}.group_size={self.group_size} "
            f"must be ≤ {g}.n_features={self.n_features}",
        )


@dataclasses.dataclass
class SyntheticRowsConfig(SyntheticConfig):
    """`source=synthetic` (sae-cache): n_rows of the same data; eval_tokens (inherited) is unused."""

    n_rows: int = 1_000_000

    group_key = "source"

    def check(self) -> None:
        super().check()
        require(self.n_rows > 0, f"source.n_rows={self.n_rows} must be > 0")
        require(
            self.d_out is None,
            f"source.d_out={self.d_out}: sae-cache stores x alone; pairs are generated on the fly by "
            "`sae-train data=synthetic data.d_out=N`",
        )


# Distinct hash seeds for the independent draws of one key (arbitrary odd constants).
_MAGNITUDE, _GROUP, _SHARE = (np.uint32(c) for c in (0x68E31DA4, 0xB5297A4D, 0x1B56C4E9))  # no JAX at import
_TARGETS = 0x2545F491  # folded into the features' key for the output directions v (the d_i use the key itself)
_X_NOISE, _Y_NOISE = 1, 2  # folded into a batch's key for x's and y's noise


def normal_quantile(u: jax.Array) -> jax.Array:
    """The standard normal's u-quantile for u on [0, 1) (24-bit uniforms: 2u − 1 is exact), finite at
    u = 0 (the next quantile up, ≈ −5.3σ)."""
    return jnp.sqrt(2.0) * jax.lax.erf_inv(jnp.maximum(2.0 * u - 1.0, -1.0 + 2.0**-23))


def _key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two uint32 words of a PRNG key (raw uint32[2] or typed)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = key.reshape(-1).astype(jnp.uint32)
    return words[0], words[-1]


def firing_probabilities(n_features: int, mean_active: float, decay: float) -> np.ndarray:
    """[n_features] p_i ∝ (i + 1)^(−decay), capped at 1, summing to mean_active."""
    weights = (np.arange(n_features) + 1.0) ** -decay
    p = np.minimum(weights * mean_active / weights.sum(), 1.0)
    for _ in range(100):  # redistribute the mass lost to the cap
        deficit = mean_active - p.sum()
        free = p < 1
        if deficit < 1e-9 or not free.any():
            break
        p[free] = np.minimum(p[free] + deficit * weights[free] / weights[free].sum(), 1.0)
    return p.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SyntheticFeatures:
    """The ground truth of a synthetic run. directions: [n_features, d_in]; probabilities: [n_features];
    group: [n_features] int, the correlated group of each feature (−1: none); out_directions:
    [n_features, d_out] when cfg.d_out is set, else None."""

    cfg: SyntheticConfig
    directions: jax.Array
    probabilities: jax.Array
    group: jax.Array
    out_directions: jax.Array | None = None

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @classmethod
    def create(cls, cfg: SyntheticConfig, key: jax.Array) -> SyntheticFeatures:
        directions = random_unit_rows(key, cfg.n_features, cfg.d_in)
        targets = jax.random.fold_in(key, _TARGETS)
        out = None if cfg.d_out is None else random_unit_rows(targets, cfg.n_features, cfg.d_out)
        p = firing_probabilities(cfg.n_features, cfg.mean_active, cfg.probability_decay)
        n_grouped = cfg.n_correlated_groups * cfg.group_size
        group = np.full(cfg.n_features, -1, np.int32)
        group[:n_grouped] = np.arange(n_grouped) // cfg.group_size
        # Spread grouped features over the probability ranks rather than taking the most frequent.
        group = np.random.default_rng(0).permutation(group)
        return cls(cfg, directions, jnp.asarray(p), jnp.asarray(group), out)

    def sample_coefficients(self, key: jax.Array, batch_size: int) -> jax.Array:
        """[batch_size, n_features] sparse non-negative coefficients c (jit-able; batch_size static)."""
        cfg = self.cfg
        seed, counter = _key_words(key)
        shape = (batch_size, cfg.n_features)
        u = counter_uniform(seed, counter, shape)
        if cfg.n_correlated_groups:
            u_group = counter_uniform(seed ^ _GROUP, counter, (batch_size, cfg.n_correlated_groups))
            share = (self.group >= 0) & (counter_uniform(seed ^ _SHARE, counter, shape) < cfg.group_correlation)
            u = jnp.where(share, u_group[:, jnp.maximum(self.group, 0)], u)
        normal = normal_quantile(counter_uniform(seed ^ _MAGNITUDE, counter, shape))
        return jnp.where(u < self.probabilities, jnp.abs(cfg.magnitude_mean + cfg.magnitude_std * normal), 0.0)

    def _noisy(self, clean: jax.Array, key: jax.Array, stream: int) -> jax.Array:
        """clean + noise_std · N(0, 1) drawn from fold_in(key, stream) (clean itself when noise_std = 0)."""
        if not self.cfg.noise_std:
            return clean
        return clean + self.cfg.noise_std * jax.random.normal(jax.random.fold_in(key, stream), clean.shape)

    def sample(self, key: jax.Array, batch_size: int) -> jax.Array:
        """[batch_size, d_in] activations x = c · directions + noise (jit-able; batch_size static)."""
        return self._noisy(self.sample_coefficients(key, batch_size) @ self.directions, key, _X_NOISE)

    def sample_pair(self, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """(x [batch_size, d_in], y [batch_size, d_out]): x = c · directions + noise (as `sample`), y = c ·
        out_directions + noise' with the same c and independent noise' (jit-able; batch_size static)."""
        c = self.sample_coefficients(key, batch_size)
        return self._noisy(c @ self.directions, key, _X_NOISE), self._noisy(c @ self.out_directions, key, _Y_NOISE)


class SyntheticBatches:
    """`data=synthetic`: training and held-out batches drawn on the device from the ground-truth features:
    x [batch_size, d_in], or pairs (x, y [batch_size, d_out]) when d_out is set."""

    process_local = False
    n_layers = None

    def __init__(self, cfg: SyntheticConfig, batch_size: int, seed: int):
        key = jax.random.PRNGKey(seed)
        self.features = SyntheticFeatures.create(cfg, jax.random.fold_in(key, 0))
        self._train_key, self._eval_key, self._sample_key = (jax.random.fold_in(key, i) for i in (1, 2, 3))
        draw = self.features.sample if cfg.d_out is None else self.features.sample_pair
        self._sample = jax.jit(draw, static_argnums=1)
        self.d_in, self.d_out = cfg.d_in, cfg.d_out
        self.eval_tokens = cfg.eval_tokens

    @property
    def ground_truth(self) -> jax.Array:
        """The unit directions a decoder should recover: [n_features, d_out] for pairs, else [n_features, d_in]."""
        return self.features.directions if self.d_out is None else self.features.out_directions

    @property
    def ground_truth_in(self) -> jax.Array | None:
        """[n_features, d_in] the directions x is made of, for pairs (a transcoder's encoder); None for an SAE."""
        return None if self.d_out is None else self.features.directions

    def sample(self, n: int, seed: int) -> Batch:
        return self._sample(jax.random.fold_in(self._sample_key, seed), n)

    def train_batches(self, batch_size: int, n_batches: int, seed: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches start_batch .. n_batches − 1 of the seed's stream (a resumed run starts past 0)."""
        key = jax.random.fold_in(self._train_key, seed)
        for i in range(start_batch, n_batches):
            yield self._sample(jax.random.fold_in(key, i), batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(-(-self.eval_tokens // batch_size)):
            yield self._sample(jax.random.fold_in(self._eval_key, i), batch_size)


class SyntheticRows:
    """`source=synthetic`: n_rows rows; the directions are those of `sae-train data=synthetic` with the same seed."""

    with_tokens = False
    resume_unit = 1

    def __init__(self, cfg: SyntheticRowsConfig, chunk_rows: int, seed: int):
        key = jax.random.PRNGKey(seed)
        self.features = SyntheticFeatures.create(cfg, jax.random.fold_in(key, 0))
        self._key = jax.random.fold_in(key, 4)  # 1..3: sae-train's train / eval / sample streams
        self._sample = jax.jit(self.features.sample, static_argnums=1)
        self.d_in, self.n_rows = cfg.d_in, cfg.n_rows
        self.block_rows = block_rows(max(cfg.n_features, cfg.d_in))
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("eval_tokens", "d_out")}
        self.provenance = {"source": "synthetic", "config": config, "block_rows": self.block_rows, "seed": seed}

    @property
    def ground_truth(self) -> np.ndarray:
        """[n_features, d_in] unit directions."""
        return np.asarray(self.features.directions, np.float32)

    def block(self, index: int) -> jax.Array:
        return self._sample(jax.random.fold_in(self._key, index), self.block_rows)

    def chunks(self, start: int) -> Iterator[Chunk]:
        return block_chunks(self.block, self.block_rows, self.n_rows, start)

    def files(self) -> dict[str, str]:
        return {}


BATCH_SOURCES.register("synthetic", BatchSourceEntry(SyntheticConfig, SyntheticBatches))
ROW_SOURCES.register("synthetic", RowSourceEntry(SyntheticRowsConfig, SyntheticRows))
