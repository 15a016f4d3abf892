"""Directions from contrast, and monitoring by projection on them.

From two sets of examples (token ids, each with the index where its response starts), the activations at
every chosen site are pooled per example (`POOLINGS`), and a site's direction is

    mean_difference:  v = mean_i pooled(pos_i) − mean_j pooled(neg_j)       (CAA, Rimsky et al. 2024;
                                                                             persona vectors, Chen et al. 2025)
    pca_diff:         v = first principal component of pooled(pos_i) − pooled(neg_i) (paired), its sign
                      chosen so that the positives project higher (repeng's `pca_diff`)

Monitoring: a token's score is its activation projected on the unit direction, h · v / ‖v‖.
A `Direction` is saved as direction.safetensors ([n_sites, d]) + direction.json (sites, pooling, method,
where the texts came from).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from sae.errors import DataError
from sae.models.base import Model

POOLINGS = ("response_mean", "last", "prompt_mean", "mean")
METHODS = ("mean_difference", "pca_diff")


@dataclasses.dataclass(frozen=True)
class Example:
    """Token ids [n] of one text; response_start: where its response begins (0: all of it is response)."""

    tokens: np.ndarray
    response_start: int = 0


def pooled_activations(
    model: Model, sites: Sequence[str], examples: Sequence[Example], pooling: str, batch_size: int = 16
) -> dict[str, np.ndarray]:
    """{site: [n_examples, d]}: each example's activations pooled over its tokens (`pooling`). Examples are
    right-padded to the batch's longest (a causal model's earlier positions do not see the padding; an
    encoder gets the attention mask)."""
    if pooling not in POOLINGS:
        raise DataError(f"pooling={pooling!r} is not one of {list(POOLINGS)}")
    if not examples:
        raise DataError("a contrast needs at least one example on each side")
    for i, e in enumerate(examples):
        n = len(e.tokens)
        if n == 0 or not 0 <= e.response_start < n or (pooling == "prompt_mean" and e.response_start == 0):
            raise DataError(f"example {i}: {n} tokens, response_start={e.response_start} leaves nothing to pool")
    graphdef, state = nnx.split(model)
    sites = list(sites)

    @jax.jit
    def run(state, tokens, mask, weights):
        _, got = nnx.merge(graphdef, state)(tokens, capture=sites, attention_mask=None if model.config.causal else mask)
        return {s: jnp.einsum("bs,bsd->bd", weights, got[s].astype(jnp.float32)) for s in sites}

    out: dict[str, list] = {s: [] for s in sites}
    length = max(len(e.tokens) for e in examples)  # one shape for every batch: one compilation
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo : lo + batch_size]
        tokens = np.zeros((len(batch), length), np.int32)
        mask = np.zeros((len(batch), length), np.int32)
        weights = np.zeros((len(batch), length), np.float32)
        for i, e in enumerate(batch):
            n, r = len(e.tokens), e.response_start
            tokens[i, :n], mask[i, :n] = e.tokens, 1
            span = {"response_mean": (r, n), "last": (n - 1, n), "prompt_mean": (0, r), "mean": (0, n)}[pooling]
            weights[i, span[0] : span[1]] = 1.0 / (span[1] - span[0])
        for s, v in run(state, tokens, mask, weights).items():
            out[s].append(np.asarray(v))
    return {s: np.concatenate(v) for s, v in out.items()}


def mean_difference(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """[n_pos, d], [n_neg, d] -> the difference of their means [d]."""
    return positive.mean(0) - negative.mean(0)


def pca_diff(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """The first principal component [d] (unit) of the paired differences positive_i − negative_i, signed so
    that the positives project higher on average."""
    if positive.shape != negative.shape:
        raise DataError(f"pca_diff pairs the examples: {len(positive)} positive and {len(negative)} negative")
    diff = positive - negative
    _, _, vt = np.linalg.svd(diff - diff.mean(0), full_matrices=False)
    v = vt[0]
    return v if (diff @ v).mean() >= 0 else -v


@dataclasses.dataclass
class Direction:
    """One direction per site: vectors [n_sites, d]."""

    sites: list[str]
    vectors: np.ndarray
    pooling: str
    method: str
    source: dict = dataclasses.field(default_factory=dict)

    def vector(self, site: str) -> np.ndarray:
        if site not in self.sites:
            raise DataError(f"the direction has no site {site!r}; its sites: {self.sites}")
        return self.vectors[self.sites.index(site)]

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"direction": np.ascontiguousarray(self.vectors, np.float32)}, directory / "direction.safetensors")
        meta = {"sites": self.sites, "pooling": self.pooling, "method": self.method, "source": self.source}
        (directory / "direction.json").write_text(json.dumps(meta, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Direction:
        directory = Path(directory)
        for name in ("direction.safetensors", "direction.json"):
            if not (directory / name).is_file():
                raise DataError(f"'{directory}' has no {name} (a direction saved by Direction.save / sae-steer)")
        meta = json.loads((directory / "direction.json").read_text())
        vectors = load_file(directory / "direction.safetensors")["direction"]
        if vectors.shape[0] != len(meta["sites"]):
            raise DataError(f"{directory}: {vectors.shape[0]} vectors for {len(meta['sites'])} sites")
        return cls(meta["sites"], vectors, meta["pooling"], meta["method"], meta.get("source", {}))


def contrast(
    model: Model,
    sites: Sequence[str],
    positive: Sequence[Example],
    negative: Sequence[Example],
    pooling: str = "response_mean",
    method: str = "mean_difference",
    source: dict | None = None,
) -> Direction:
    """The direction at every site from the contrast of `positive` against `negative` examples."""
    if method not in METHODS:
        raise DataError(f"method={method!r} is not one of {list(METHODS)}")
    pos = pooled_activations(model, sites, positive, pooling)
    neg = pooled_activations(model, sites, negative, pooling)
    fn = mean_difference if method == "mean_difference" else pca_diff
    return Direction(list(sites), np.stack([fn(pos[s], neg[s]) for s in sites]), pooling, method, source or {})


def projection(acts: np.ndarray | jax.Array, v: np.ndarray) -> np.ndarray:
    """Monitoring: acts [..., d] projected on the unit direction, acts · v / ‖v‖: [...]."""
    return np.asarray(acts, np.float32) @ (np.asarray(v, np.float32) / np.linalg.norm(v))
