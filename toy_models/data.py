"""Sparse synthetic features for the toy models (Elhage et al. 2022, "Toy Models of Superposition", §2).

Each feature x_i is zero with probability S = 1 − p_i, else uniform on [0, 1) (on [−1, 1) for the
absolute-value task). The feature probability p is per instance, so one batch serves every instance.

One uniform number per feature is enough: u < p decides whether the feature fires, and given that it
fires, u / p is itself uniform on [0, 1). Correlated pairs share the first member's draw for both
masks; anti-correlated pairs fire one member at most (the pair fires with probability 2p, then the
draw picks which), as in ARENA 1.3.1's correlated-features exercise.

The uniforms come from `counter_uniform`, a keyed integer hash of (seed, step, element index). On a
CPU it is about 6× faster than JAX's threefry (which spent most of a toy step); `rng="threefry"` keeps
JAX's generator for comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RNG_KINDS = ("hash", "threefry")


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons, "Hash function prospector"): a bijective, well-avalanched uint32 mixer."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform float32 on [0, 1) of `shape`, a pure function of (seed, step, element index).

    The step and seed are hashed into two 32-bit keys, and each element's index goes through two
    keyed rounds of the mixer, so values within a step are distinct and steps are independent streams.
    """
    size = 1
    for n in shape:
        size *= n
    if size >= 2**32:
        raise ValueError(f"counter_uniform: {size} elements per step exceed the 32-bit counter")
    key1 = _mix(jnp.asarray(seed, jnp.uint32) * jnp.uint32(0x9E3779B9) ^ _mix(jnp.asarray(step, jnp.uint32)))
    key2 = _mix(key1 ^ jnp.uint32(0x5BD1E995))
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    bits = _mix(_mix(index ^ key1) + key2)
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # 24 bits: exact in float32


def uniform(rng: str, seed: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[0, 1) uniforms from the named generator (see RNG_KINDS)."""
    if rng == "hash":
        return counter_uniform(seed, step, shape)
    if rng == "threefry":
        key = jax.random.fold_in(jax.random.key(jnp.asarray(seed, jnp.uint32)), step)
        return jax.random.uniform(key, shape)
    raise ValueError(f"rng={rng!r} is not one of {RNG_KINDS}")


def sparse_features(
    u: jax.Array,
    feature_probability: jax.Array,
    signed: bool = False,
    correlated_pairs: int = 0,
    anticorrelated_pairs: int = 0,
) -> jax.Array:
    """Sparse features from uniforms, feature-major: the batch is the last (fastest) axis.

    u: [n_instances, n_features, batch] uniforms on [0, 1); feature_probability: [n_instances].
    Features 0 .. 2c−1 form c correlated pairs, the next 2a form a anti-correlated pairs, the rest are
    independent. Returns x: [n_instances, n_features, batch], each non-zero value uniform on [0, 1)
    (or [−1, 1) when `signed`).
    """
    p = feature_probability[:, None, None]

    def emit(fires: jax.Array, value: jax.Array) -> jax.Array:
        return jnp.where(fires, 2.0 * value - 1.0 if signed else value, 0.0)

    def interleave(first: jax.Array, second: jax.Array) -> jax.Array:
        """[I, c, B] twice -> [I, 2c, B] with the pairs' members side by side."""
        n_instances, c, batch = first.shape
        return jnp.stack([first, second], axis=2).reshape(n_instances, 2 * c, batch)

    n_corr, n_anti = 2 * correlated_pairs, 2 * anticorrelated_pairs
    parts = []
    if n_corr:
        first, second = u[:, 0:n_corr:2], u[:, 1:n_corr:2]
        fires = first < p
        parts.append(interleave(emit(fires, first / p), emit(fires, second)))
    if n_anti:
        draw = u[:, n_corr : n_corr + n_anti : 2]
        parts.append(interleave(emit(draw < p, draw / p), emit((draw >= p) & (draw < 2 * p), (draw - p) / p)))
    rest = u[:, n_corr + n_anti :]
    parts.append(emit(rest < p, rest / p))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
