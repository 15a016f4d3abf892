"""The toy models of superposition (Elhage et al. 2022), with a leading instance axis.

W: [n_instances, m, n] in the paper's orientation (column W_i is feature i's direction in the
m-dimensional hidden space); b: [n_instances, n]. Batches are feature-major, x: [n_instances, n, batch]
with the batch on the fastest axis: XLA's CPU batched matmuls run about 2× faster that way than with
[n_instances, batch, n] for these small m and n.

- linear      x' = WᵀW x + b                                   (§2, "Linear models")
- relu        x' = ReLU(WᵀW x + b)                              (§2, the ReLU output model)
- privileged  h = ReLU(W x), x' = ReLU(Wᵀ h + b)                (§7, "Superposition in a privileged basis")
- abs         h = ReLU(W₁ x), y' = ReLU(W₂ h + b), target |x|   (§9, "Computation in superposition")

Weights start Xavier-normal per instance (std √(2/(m+n))), biases at zero. With `permuted_init` the seeds of a
setting share one draw per 2n seeds and differ in which feature takes which initial direction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("linear", "relu", "privileged", "abs")
INITS = ("normal", "permuted")

Params = dict[str, jax.Array]


def init_params(key: jax.Array, kind: str, n_instances: int, n_features: int, n_hidden: int) -> Params:
    """{'W': [I, m, n], 'b': [I, n]}; the abs model has 'W1': [I, m, n] and 'W2': [I, n, m] instead of W.

    Instance i draws from fold_in(key, i), so an instance starts the same however many run beside it.
    """
    if kind not in KINDS:
        raise ValueError(f"model.kind={kind!r} is not one of {KINDS}")
    std = (2.0 / (n_features + n_hidden)) ** 0.5

    def one(i: jax.Array) -> Params:
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        if kind == "abs":
            return {
                "W1": std * jax.random.normal(k1, (n_hidden, n_features)),
                "W2": std * jax.random.normal(k2, (n_features, n_hidden)),
            }
        return {"W": std * jax.random.normal(k1, (n_hidden, n_features))}

    params = jax.vmap(one)(jnp.arange(n_instances))
    params["b"] = jnp.zeros((n_instances, n_features))
    return params


def permuted_init(key: jax.Array, kind: str, n_seeds: int, n_settings: int, n_features: int, n_hidden: int) -> Params:
    """init_params for n_seeds × n_settings instances (seed-major), the seeds in groups of 2n variants of one draw.

    Seed k starts from draw ⌊k / 2n⌋ of its setting with feature column i moved to column (i + k) mod n, and the
    new column 0 negated when k mod 2n ≥ n: every feature takes every initial direction, in both sign relations to
    the others. Which features training pairs up follows their initial directions (a pair starting nearly opposite
    becomes antipodal; for m = 1 a same-sign start stays in a poorer minimum), so the variants let the loss, not
    the draw, decide. Not for the abs model (two weight matrices).
    """
    if kind == "abs":
        raise ValueError("permuted_init: the abs model has no single W to permute")
    n = n_features
    n_draws = -(-n_seeds // (2 * n))
    base = init_params(key, kind, n_draws * n_settings, n, n_hidden)["W"].reshape(n_draws, n_settings, n_hidden, n)
    k = jnp.arange(n_seeds)
    source = (jnp.arange(n)[None, :] - k[:, None]) % n  # [n_seeds, n]: the draw's column that becomes column i
    sign = jnp.where((jnp.arange(n)[None, :] == 0) & (k[:, None] % (2 * n) >= n), -1.0, 1.0)  # [n_seeds, n]
    W = jnp.take_along_axis(base[k // (2 * n)], source[:, None, None, :], axis=-1) * sign[:, None, None, :]
    return {"W": W.reshape(n_seeds * n_settings, n_hidden, n), "b": jnp.zeros((n_seeds * n_settings, n))}


def hidden(params: Params, x: jax.Array, kind: str) -> jax.Array:
    """The hidden activations h: [I, m, batch] (h = W x, or ReLU of it for privileged/abs)."""
    if kind == "abs":
        return jax.nn.relu(jnp.einsum("imn,inb->imb", params["W1"], x))
    h = jnp.einsum("imn,inb->imb", params["W"], x)
    return jax.nn.relu(h) if kind == "privileged" else h


def forward(params: Params, x: jax.Array, kind: str) -> jax.Array:
    """The reconstruction x' (or y' for abs): [I, n, batch]."""
    h = hidden(params, x, kind)
    if kind == "abs":
        out = jnp.einsum("inm,imb->inb", params["W2"], h)
    else:
        out = jnp.einsum("imn,imb->inb", params["W"], h)
    out = out + params["b"][:, :, None]
    return out if kind == "linear" else jax.nn.relu(out)


def target(x: jax.Array, kind: str) -> jax.Array:
    """What the model must output: x itself, or |x| for the abs computation task."""
    return jnp.abs(x) if kind == "abs" else x


def loss_per_instance(params: Params, x: jax.Array, importance: jax.Array, kind: str) -> jax.Array:
    """Importance-weighted squared error, averaged over batch and features: [I].

    importance: [I, n]. The training objective is the sum of this over instances (Anthropic's notebook).
    """
    error = importance[:, :, None] * (target(x, kind) - forward(params, x, kind)) ** 2
    return error.mean(axis=(1, 2))


def feature_directions(params: Params) -> jax.Array:
    """The feature embedding whose columns are compared across analyses: W (or W₁): [I, m, n]."""
    return params["W1"] if "W1" in params else params["W"]
