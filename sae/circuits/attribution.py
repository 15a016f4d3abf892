"""Attribution: the direct effects between one prompt's nodes in its local replacement model (Ameisen et al.
2025, §2.3; circuit-tracer `attribute`).

The replacement model is linear in the token embeddings e and the MLP outputs u (replacement.py), so the
effect of a source on a target is a vector-Jacobian product. A target row is the gradient of the target's
pre-activation (a feature t of layer ℓ at position p: x^ℓ_p · W_enc^ℓ[:, t]) or of a logit less the mean
logit (cotangent onehot(token) − 1/V on the last position's pre-cap logits) with respect to (e, u):
g_e [P, d], g_u [L, P, d]. Then, with the activation a_s and the decoders W_dec,s of a source feature s at
position p:

    A_{s→t} = a_s Σ_m W_dec,s[m] · g_u[m, p]       (the layers m it writes into)
    A_{ε^m_p→t} = ε^m_p · g_u[m, p]                 A_{token p→t} = e_p · g_e[p]

`jax.vjp` of the frozen forward under `jax.vmap` gives `batch` target rows per call; the sources at each
position are laid out in a [P, K] grid of decoders so the feature edges of a batch are one batched matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sae.circuits.graph import Graph
from sae.circuits.replacement import Replacement, Trace, replacement
from sae.circuits.transcoders import Transcoders
from sae.models.base import Model

FEATURE, LOGIT, PAD = 0, 1, 2


def logit_targets(logits: np.ndarray, max_logits: int = 10, desired_prob: float = 0.95):
    """The most probable tokens whose probabilities sum to `desired_prob`, at most `max_logits` of them:
    (tokens [n], probabilities [n]) from the last position's logits [V]."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")[:max_logits]
    n = min(int(np.searchsorted(np.cumsum(p[order]), desired_prob)) + 1, len(order))
    return order[:n], p[order[:n]].astype(np.float32)


def _grid(positions: np.ndarray, n_pos: int, multiple: int = 8) -> tuple[np.ndarray, int]:
    """Each source's slot in a [n_pos, K] grid by position (K: the most at one position, rounded up)."""
    counts = np.bincount(positions, minlength=n_pos)
    k = max(multiple, -(-int(counts.max(initial=1)) // multiple) * multiple)
    order = np.argsort(positions, kind="stable")
    rank = np.empty(len(positions), np.int64)
    rank[order] = np.arange(len(positions)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[positions[order]]
    return positions * k + rank, k


def _rows_fn(r: Replacement):
    """jitted (…, targets) -> [B, P·K + L·P + P]: the edge weights into a batch of B targets from every
    source slot (features in the [P, K] grid, errors, tokens)."""

    def rows(state, tc: Transcoders, frozen, tokens, embed, mlp_in, errors, grid_dec, grid_act, last, targets):
        kind, layer, pos, index = targets  # [B] each; index: the feature, or the logit's token
        n_layers, n_pos, d = mlp_in.shape

        def linear(e, u):
            x, pre, _ = r.forward_fn(state, tc, frozen, tokens, e, u)
            return x, pre[last]

        (x, pre), pull = jax.vjp(linear, embed, mlp_in)
        b = jnp.arange(kind.shape[0])
        enc = tc.W_enc[layer, :, index] * (kind == FEATURE)[:, None]  # [B, d]
        ct_x = jnp.zeros((kind.shape[0], *x.shape), x.dtype).at[b, layer, pos].set(enc)
        onehot = jax.nn.one_hot(index, pre.shape[0], dtype=pre.dtype) - 1.0 / pre.shape[0]
        ct_logit = onehot * (kind == LOGIT)[:, None]
        with jax.default_matmul_precision("highest"):
            g_e, g_u = jax.vmap(pull)((ct_x, ct_logit))  # [B, P, d], [B, L, P, d]
            g = g_u.transpose(0, 2, 1, 3).reshape(kind.shape[0], n_pos, n_layers * d)
            feature = jnp.einsum("bpe,pke->bpk", g, grid_dec) * grid_act  # [B, P, K]
            error = jnp.einsum("lpd,blpd->blp", errors, g_u)
            token = jnp.einsum("pd,bpd->bp", embed, g_e)
        return jnp.concatenate([feature.reshape(len(b), -1), error.reshape(len(b), -1), token], 1)

    return jax.jit(rows)


def attribute(
    model: Model,
    tc: Transcoders,
    tokens,
    max_logits: int = 10,
    desired_prob: float = 0.95,
    batch: int = 32,
) -> Graph:
    """The attribution graph of one prompt (tokens [P] int): every active feature at every position, the
    error and token nodes, and the logits covering `desired_prob` of the next token's probability (at most
    `max_logits`). DataError for transcoders that do not fit the model, an empty or too long prompt."""
    r = replacement(model, tc)
    trace = r.trace(tokens)
    if not hasattr(r, "rows"):
        r.rows = _rows_fn(r)  # compiled once per replacement model
    return _attribute(r, trace, r.rows, max_logits, desired_prob, batch)


def _attribute(r: Replacement, trace: Trace, rows, max_logits: int, desired_prob: float, batch: int) -> Graph:
    tc, n = r.tc, trace.n_tokens
    n_layers, n_pad = trace.x.shape[:2]
    acts = np.asarray(trace.acts)
    active = np.argwhere(acts[:, :n] > 0)  # [n_features, 3] (layer, position, feature), layer-major
    values = acts[active[:, 0], active[:, 1], active[:, 2]]
    logits = np.asarray(trace.logits[n - 1])
    logit_tokens, logit_probs = logit_targets(logits, max_logits, desired_prob)

    # sources: the active features in a [P, K] grid of decoders into every layer
    slot, k = _grid(active[:, 1], n_pad)
    dec = np.zeros((n_pad * k, n_layers, tc.b_dec.shape[1]), np.float32)
    act = np.zeros(n_pad * k, np.float32)
    for layer in range(n_layers):
        here = active[:, 0] == layer
        dec[slot[here]] = np.asarray(tc.decoder_vectors(layer, jnp.asarray(active[here, 2])))
        act[slot[here]] = values[here]
    grid_dec = jnp.asarray(dec.reshape(n_pad, k, -1))
    grid_act = jnp.asarray(act.reshape(n_pad, k))

    # targets: every feature's pre-activation, then each target logit
    n_targets = len(active) + len(logit_tokens)
    total = -(-n_targets // batch) * batch
    kind = np.full(total, PAD, np.int32)
    layer, pos, index = (np.zeros(total, np.int32) for _ in range(3))
    kind[: len(active)], kind[len(active) : n_targets] = FEATURE, LOGIT
    layer[: len(active)], pos[: len(active)], index[: len(active)] = active.T
    index[len(active) : n_targets] = logit_tokens
    mlp_in = trace.mlp_in(tc.b_dec)
    out = [
        rows(
            r.state,
            tc,
            trace.frozen,
            trace.padded,
            trace.embed,
            mlp_in,
            trace.errors,
            grid_dec,
            grid_act,
            n - 1,
            tuple(jnp.asarray(a[i : i + batch]) for a in (kind, layer, pos, index)),
        )
        for i in range(0, total, batch)
    ]
    block = np.asarray(jnp.concatenate(out))[:n_targets]  # [targets, P·K + L·P + P] (one transfer)

    # the adjacency over [features, errors (L × n), tokens (n), logits]
    n_feat, n_logit = len(active), len(logit_tokens)
    size = n_feat + n_layers * n + n + n_logit
    adjacency = np.zeros((size, size), np.float32)
    cols = n_pad * k
    errors = block[:, cols : cols + n_layers * n_pad].reshape(n_targets, n_layers, n_pad)[:, :, :n]
    tokens = block[:, cols + n_layers * n_pad :][:, :n]
    target_rows = np.r_[0:n_feat, size - n_logit : size]
    adjacency[target_rows, :n_feat] = block[:, slot]
    adjacency[target_rows, n_feat : n_feat + n_layers * n] = errors.reshape(n_targets, -1)
    adjacency[target_rows, n_feat + n_layers * n : n_feat + n_layers * n + n] = tokens
    return Graph(
        prompt_tokens=trace.tokens.copy(),
        features=active.astype(np.int64),
        activations=values.astype(np.float32),
        logit_tokens=logit_tokens.astype(np.int64),
        logit_probs=logit_probs,
        adjacency=adjacency,
        n_layers=n_layers,
        n_features=tc.n_features,
        kind=tc.kind,
        names=tc.names,
    )
