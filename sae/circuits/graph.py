"""An attribution graph as plain arrays (circuit-tracer's `Graph`), and what is computed on it: influence,
pruning and the replacement and completeness scores (Ameisen et al. 2025, §2.4, §3.2 and Appendix on
pruning; circuit-tracer `graph.py`).

Nodes, in this order: the n active features (layer-major, then position, then feature), the L·P error nodes
(layer-major), the P token nodes, the n_logits target logits. `adjacency[t, s]` is the direct effect A_{s→t}
of source s on target t (rows: features and logits; error and token rows are zero).

With Â the row-normalised |A| (each row summing to 1) and w the logits' probabilities on the logit nodes,
a node's influence is its weight in all paths into the logits, I = w (Â + Â² + …) = w ((1 − Â)⁻¹ − 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sae.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Graph:
    prompt_tokens: np.ndarray  # [P] int
    features: np.ndarray  # [n, 3] (layer, position, feature) of each active feature
    activations: np.ndarray  # [n]
    logit_tokens: np.ndarray  # [n_logits] the target logits' token ids
    logit_probs: np.ndarray  # [n_logits] their probabilities
    adjacency: np.ndarray  # [N, N] float32, N = n + L·P + P + n_logits; rows targets, columns sources
    n_layers: int
    n_features: int  # F, features per layer (for ids ℓ·F + i)
    kind: str  # circuit-tracer's feature_type: "cross layer transcoder" | "transcoder"
    names: tuple[str, ...]  # the transcoders' runs

    @property
    def n_pos(self) -> int:
        return len(self.prompt_tokens)

    @property
    def spans(self) -> dict[str, slice]:
        """The node ranges: features, errors, tokens, logits."""
        n, e, p = len(self.features), self.n_layers * self.n_pos, self.n_pos
        return {
            "features": slice(0, n),
            "errors": slice(n, n + e),
            "tokens": slice(n + e, n + e + p),
            "logits": slice(n + e + p, n + e + p + len(self.logit_tokens)),
        }

    def logit_weights(self) -> np.ndarray:
        w = np.zeros(len(self.adjacency), np.float64)
        w[self.spans["logits"]] = self.logit_probs
        return w


def normalize(adjacency: np.ndarray) -> np.ndarray:
    """Â: |A| with each row divided by its sum (rows of zeros stay zero)."""
    a = np.abs(np.asarray(adjacency, np.float64))
    return a / np.maximum(a.sum(1, keepdims=True), 1e-10)


def influence(normalized: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """w Â + w Â² + … (the graph is acyclic, so the series ends): [N]."""
    current = weights @ normalized
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise ValueError(f"influence did not converge in {max_iter} steps: the adjacency matrix has a cycle")


@dataclasses.dataclass(frozen=True)
class Pruned:
    node_mask: np.ndarray  # [N] bool
    edge_mask: np.ndarray  # [N, N] bool
    cumulative: np.ndarray  # [N] each node's share of the total influence, cumulated from the largest
    node_threshold: float
    edge_threshold: float


def check_threshold(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name}={value}: expected a fraction in (0, 1]")
    return value


def find_threshold(scores: np.ndarray, fraction: float) -> float:
    """The smallest score among the largest ones that hold `fraction` of the total."""
    ordered = np.sort(scores.reshape(-1))[::-1]
    cumulative = np.cumsum(ordered) / max(ordered.sum(), 1e-30)
    return ordered[min(int(np.searchsorted(cumulative, fraction)), len(ordered) - 1)]


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes holding `node_threshold` of the influence on the logits (tokens and logits always), then
    the edges holding `edge_threshold` of the influence among them, then drop the features and errors left
    without an outgoing edge (and features without an incoming one), until nothing changes (circuit-tracer
    `prune_graph`)."""
    node_threshold = check_threshold("node_threshold", node_threshold)
    edge_threshold = check_threshold("edge_threshold", edge_threshold)
    spans, w = graph.spans, graph.logit_weights()
    n_features, inner = spans["features"].stop, spans["tokens"].start
    node_score = influence(normalize(graph.adjacency), w)
    nodes = node_score >= find_threshold(node_score, node_threshold)
    nodes[inner:] = True
    kept = np.where(nodes[:, None] & nodes[None, :], graph.adjacency, 0.0)
    normalized = normalize(kept)
    edge_score = normalized * (influence(normalized, w) + w)[:, None]
    edges = edge_score >= find_threshold(edge_score, edge_threshold)
    while True:
        before = nodes.copy()
        edges &= nodes[:, None] & nodes[None, :]
        nodes[:inner] &= edges[:, :inner].any(0)
        nodes[:n_features] &= edges[:n_features].any(1)
        if (nodes == before).all():
            break
    edges &= nodes[:, None] & nodes[None, :]
    order = np.argsort(-node_score, kind="stable")
    cumulative = np.zeros_like(node_score)
    cumulative[order] = np.cumsum(node_score[order]) / max(node_score.sum(), 1e-30)
    return Pruned(nodes, edges, cumulative, node_threshold, edge_threshold)


def scores(graph: Graph, pruned: Pruned | None = None) -> dict[str, float]:
    """The replacement score (the share of the paths from the logits that end at tokens rather than at
    errors) and the completeness score (the share of the nodes' input, weighted by their influence, that
    comes from non-error nodes), as circuit-tracer `compute_graph_scores`. With `pruned`, only its edges
    carry influence and whatever a node receives from outside them counts as error, so pruning can only
    lower both scores, and keeping everything leaves them as they are."""
    spans, w = graph.spans, graph.logit_weights()
    full = normalize(graph.adjacency)
    errors = spans["errors"]
    if pruned is None:
        node_score = influence(full, w)
        token = node_score[spans["tokens"]].sum()
        replacement = token / max(token + node_score[errors].sum(), 1e-30)
        complete = 1.0 - full[:, errors].sum(1)
        output = node_score + w
    else:
        kept = np.where(pruned.edge_mask, full, 0.0)
        node_score = influence(kept, w)
        replacement = node_score[spans["tokens"]].sum() / w.sum()
        complete = kept.sum(1) - kept[:, errors].sum(1)
        complete[full.sum(1) == 0] = 1.0  # tokens (and featureless rows) have no input to miss
        output = np.where(pruned.node_mask, node_score + w, 0.0)
    return {"replacement": float(replacement), "completeness": float((complete * output).sum() / output.sum())}
