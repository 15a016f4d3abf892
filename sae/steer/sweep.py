"""Steering sweeps: a score of the continuations and the loss, against the strength α of a direction.

For each α, every prompt is continued with α·v added at every position of `site` (all prompts at once, one
compiled loop for all α), the continuations scored (`SCORES`), and the mean next-token loss of the
evaluation texts taken with the same steering. Choosing the site (`choose_site`): the one whose steering
moves the score most per unit increase of the loss, at the sweep's largest |α|. Monitoring: the projection
of each prompt's last token on v (unsteered) against its continuation's score, over the prompts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from sae.errors import DataError
from sae.models.base import Model, token_losses
from sae.models.generate import batch_sampler
from sae.models.tokenizer import Tokenizer
from sae.steer.directions import Direction, Example, pooled_activations, projection
from sae.steer.interventions import Add, replacements

_ASSERTION = re.compile(r"\s*(assert\b|self\.assert\w*\s*\(|self\.fail\w*\s*\()")


def test_code(text: str) -> float:
    """ "Writes test code": the share of the text's non-blank lines that are assertions (`assert …`,
    `self.assert…(`, `self.fail…(`); 0 for a text with no lines."""
    lines = [line for line in text.split("\n") if line.strip()]
    return sum(bool(_ASSERTION.match(line)) for line in lines) / len(lines) if lines else 0.0


test_code.__test__ = False  # not a pytest test, although its name says test

SCORES: dict[str, Callable[[str], float]] = {"test_code": test_code}


@dataclasses.dataclass
class Sweep:
    """Per α: the mean score, the mean validation loss (nats/token) and the continuations (texts)."""

    site: str
    alphas: list[float]
    scores: list[float]
    losses: list[float]
    continuations: list[list[str]]
    spearman: float


class Steerer:
    """Continue `prompts` and score them, and take the loss of `eval_tokens`, with α·v added at `site`."""

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        prompts: Sequence[np.ndarray],
        eval_tokens: Sequence[np.ndarray],
        score: Callable[[str], float],
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        seed: int = 0,
    ):
        if not prompts:
            raise DataError("a sweep needs at least one prompt")
        n_ctx = model.config.n_ctx
        if max_new_tokens >= n_ctx:
            raise DataError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {n_ctx} positions")
        keep = n_ctx - max_new_tokens
        self.prompts = [np.asarray(p[-keep:], np.int32) for p in prompts]  # cut from the left to fit
        self.model, self.tokenizer, self.score = model, tokenizer, score
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.eval = np.zeros((len(eval_tokens), n_ctx), np.int32)
        self.eval_mask = np.zeros((len(eval_tokens), n_ctx - 1), np.float32)
        for i, t in enumerate(eval_tokens):
            t = np.asarray(t[:n_ctx], np.int32)
            self.eval[i, : len(t)], self.eval_mask[i, : len(t) - 1] = t, 1.0
        self._compiled: dict[str, tuple] = {}

    def _for(self, site: str, v: np.ndarray):
        if site not in self._compiled:
            items = [Add(site, v)]
            replacements(items, jnp.zeros(1), self.model)  # a site the model lacks, or a width, fails here
            generate = batch_sampler(self.model, lambda a: replacements(items, a))
            graphdef, state = nnx.split(self.model)

            @jax.jit
            def loss(state, tokens, mask, a):
                logits = nnx.merge(graphdef, state)(tokens, replace=replacements(items, a))
                return jnp.sum(token_losses(logits, tokens) * mask) / jnp.sum(mask)

            self._compiled[site] = (generate, lambda a: float(loss(state, self.eval, self.eval_mask, a)))
        return self._compiled[site]

    def at(self, site: str, v: np.ndarray, alpha: float) -> tuple[float, float, list[str]]:
        """(mean score, validation loss, continuations) with α·v added at every position of `site`."""
        generate, loss = self._for(site, np.asarray(v, np.float32))
        a = jnp.asarray([alpha], jnp.float32)
        outs = generate(self.prompts, self.max_new_tokens, self.temperature, self.seed, a)
        texts = [self.tokenizer.decode(o) for o in outs]
        return float(np.mean([self.score(t) for t in texts])), loss(a) if len(self.eval) else float("nan"), texts

    def sweep(self, site: str, v: np.ndarray, alphas: Sequence[float]) -> Sweep:
        rows = [self.at(site, v, a) for a in alphas]
        scores = [r[0] for r in rows]
        rho = stats.spearmanr(alphas, scores).statistic if len(set(scores)) > 1 else float("nan")
        return Sweep(site, list(alphas), scores, [r[1] for r in rows], [r[2] for r in rows], float(rho))


def choose_site(steerer: Steerer, direction: Direction, alpha: float) -> tuple[str, dict]:
    """The direction's site whose steering at ±α moves the score most per unit loss increase, and the
    figures of every site: {site: {score_minus, score_plus, effect, loss_increase, per_loss}}."""
    clean = steerer.at(direction.sites[0], direction.vectors[0], 0.0)[1]  # α = 0: the same at every site
    table = {}
    for site in direction.sites:
        v = direction.vector(site)
        (lo, lo_loss, _), (hi, hi_loss, _) = steerer.at(site, v, -alpha), steerer.at(site, v, alpha)
        increase = max(lo_loss, hi_loss) - clean
        table[site] = {
            "score_minus": lo,
            "score_plus": hi,
            "effect": hi - lo,
            "loss_increase": increase,
            "per_loss": (hi - lo) / max(increase, 1e-3),
        }
    return max(table, key=lambda s: table[s]["per_loss"]), table


def monitoring(
    model: Model, direction: Direction, prompts: Sequence[np.ndarray], scores: Sequence[float], start: int = 0
) -> dict:
    """Monitoring, at every site of the direction: the projection on v (unsteered) of each prompt's last
    token, and of the mean over its tokens from `start` (after the template), against its continuation's
    score. {site: {"last"|"mean": {projections, pearson, spearman}}, "scores": [...], "n": n}."""
    examples = [Example(np.asarray(p), min(start, len(p) - 1)) for p in prompts]
    out: dict = {"scores": [float(s) for s in scores], "n": len(prompts)}
    constant = len(set(scores)) < 2
    for pooling, name in (("last", "last"), ("response_mean", "mean")):
        acts = pooled_activations(model, direction.sites, examples, pooling)
        for site in direction.sites:
            proj = projection(acts[site], direction.vector(site))
            flat = constant or np.ptp(proj) == 0
            out.setdefault(site, {})[name] = {
                "projections": proj.round(5).tolist(),
                "pearson": float("nan") if flat else float(stats.pearsonr(proj, scores).statistic),
                "spearman": float("nan") if flat else float(stats.spearmanr(proj, scores).statistic),
            }
    return out
