"""A dictionary spliced into a model at a site: loss recovered (causal LMs) and embedding cosine (encoders).

With L(·) the mean next-token cross-entropy (nats/token) on held-out text,

    ce_loss_score = (L_zero − L_sae) / (L_zero − L_clean)          (Bricken et al. 2023, "loss recovered")
    kl_div        = mean over positions of KL(p_clean ‖ p_sae) = Σ_v p_clean(v) (log p_clean(v) − log p_sae(v))

where L_clean is the unmodified model's loss, L_zero the loss with the site's activation replaced by zeros
(zero ablation) and L_sae the loss with it replaced by the reconstruction x̂ = reconstruct(x). Losses and
KL are taken at the positions that have a next token (0 … seq − 2), as is

    top1_agreement = fraction of those positions where argmax_v logits_sae = argmax_v logits_clean.

The replacement model (`replacement_loss`) swaps several sites at once: for each pair (input site a_j,
output site b_j) of `pairs`, in forward order, b_j's activation becomes ŷ_j = predict(j, [a_0 … a_j]) with
the a_i read in the same, replaced forward pass (errors compound as in the model the dictionaries stand
for: a transcoder per MLP reads inputs[j] alone, a cross-layer transcoder sums over them all); zero
ablation there zeros every b_j. For an encoder,

    embedding_cosine = mean over texts of cos(e_clean, e_sae),  e = normalised mean of the last hidden states

(the sentence-transformers pooling of all-MiniLM-L6-v2). `spliced` (a [seq] bool mask) limits the
replacement to the positions the dictionary was trained on (a store without BOS positions: not the BOS);
elsewhere the site keeps its activation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae.models.base import Hooks, Model, ModelError, token_losses
from sae.models.bert import mean_pooled

Reconstruct = Callable[[jax.Array], jax.Array]
Predict = Callable[[int, list[jax.Array]], jax.Array]  # (j, inputs [n, d_in] of pairs 0..j) -> ŷ_j [n, d_out]


def _splice(reconstruct: Reconstruct, where: jax.Array | None):
    """fn(acts [batch, seq, d]) -> acts with reconstruct applied to the [batch·seq, d] rows at `where`."""

    def fn(acts: jax.Array) -> jax.Array:
        new = jnp.asarray(reconstruct(acts.reshape(-1, acts.shape[-1]))).reshape(acts.shape).astype(acts.dtype)
        return new if where is None else jnp.where(where[None, :, None], new, acts)

    return fn


def _totals(model: Model, batch_sums, token_batches: Iterable[np.ndarray]) -> tuple[dict[str, float], int, int]:
    """(Σ over batches of batch_sums(model, tokens), one jitted call each; texts; positions with a next token)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens: batch_sums(nnx.merge(graphdef, state), tokens))
    totals: dict[str, float] = {}
    n_texts = n_tokens = 0
    for batch in token_batches:
        tokens = jnp.asarray(np.asarray(batch), jnp.int32)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"token batches must be [batch, seq ≥ 2] arrays; got shape {tuple(tokens.shape)}")
        for k, v in run(state, tokens).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n_texts += tokens.shape[0]
        n_tokens += tokens.shape[0] * (tokens.shape[1] - 1)
    if not n_texts:
        raise ValueError("splicing needs at least one token batch")
    return totals, n_texts, n_tokens


def _scores(logits: dict[str, jax.Array], tokens: jax.Array, replaced: str) -> dict[str, jax.Array]:
    """Sums over the positions with a next token: ce_loss_<k> for each k of logits ([batch, seq, vocab];
    "clean" and "zero_ablation" among them), and for logits[replaced] kl_div, kl_div_zero_ablation and
    top1_agreement."""
    logp = {k: jax.nn.log_softmax(v[:, :-1].astype(jnp.float32), axis=-1) for k, v in logits.items()}
    p_clean = jnp.exp(logp["clean"])
    out = {f"ce_loss_{k}": token_losses(v, tokens).sum() for k, v in logits.items()}
    out["kl_div"] = (p_clean * (logp["clean"] - logp[replaced])).sum()
    out["kl_div_zero_ablation"] = (p_clean * (logp["clean"] - logp["zero_ablation"])).sum()
    top1 = [jnp.argmax(logits[k][:, :-1], axis=-1) for k in ("clean", replaced)]
    out["top1_agreement"] = (top1[0] == top1[1]).sum()
    return out


def _means(totals: dict[str, float], n_tokens: int, replaced: str) -> dict[str, float]:
    """The per-position means of `_scores`' sums, with ce_loss_score for `replaced` and n_tokens."""
    out = {k: v / n_tokens for k, v in totals.items()}
    gap = out["ce_loss_zero_ablation"] - out["ce_loss_clean"]  # 0 when ablating the site changes nothing
    out["ce_loss_score"] = (out["ce_loss_zero_ablation"] - out[f"ce_loss_{replaced}"]) / gap if gap else float("nan")
    out["n_tokens"] = n_tokens
    return out


def loss_recovered(
    model: Model,
    site: str,
    reconstruct: Reconstruct,
    token_batches: Iterable[np.ndarray],
    spliced: np.ndarray | None = None,
) -> dict[str, float]:
    """CE losses clean / zero-ablated / spliced, the CE-loss score, the KL to the clean model and top-1 agreement.

    model: a causal LM; site: a hook name; reconstruct: a JAX-traceable map x [n, d] -> x̂ [n, d];
    token_batches: held-out [batch, seq] integer arrays; spliced: [seq] bool, the positions replaced (all
    when None; zero ablation replaces the same ones). Returns ce_loss_clean, ce_loss_zero_ablation,
    ce_loss_sae (nats/token), ce_loss_score, kl_div and kl_div_zero_ablation (nats/token), top1_agreement,
    n_tokens.
    """
    where = None if spliced is None else jnp.asarray(spliced, bool)

    def sums(m: Model, tokens: jax.Array) -> dict[str, jax.Array]:
        logits = {
            "clean": m(tokens),
            "zero_ablation": m(tokens, replace={site: _splice(jnp.zeros_like, where)}),
            "sae": m(tokens, replace={site: _splice(reconstruct, where)}),
        }
        return _scores(logits, tokens, "sae")

    totals, _, n_tokens = _totals(model, sums, token_batches)
    return _means(totals, n_tokens, "sae")


def _check_pairs(model: Model, pairs: list[tuple[str, str]]) -> None:
    """ModelError unless pairs is non-empty and its sites are the model's, each once, in forward order
    a_0 < b_0 < a_1 < b_1 < …"""
    sites = [site for pair in pairs for site in pair]
    Hooks(model.sites, sites)  # unknown names raise, listing the valid ones
    order = [model.sites.index(site) for site in sites]
    if not pairs or any(len(pair) != 2 for pair in pairs) or order != sorted(set(order)):
        raise ModelError(f"pairs must be [(input site, output site), …] in forward order, each site once; got {pairs}")


def _replacement(pairs: list[tuple[str, str]], predict: Predict, where: jax.Array | None) -> dict:
    """A replace dict for one forward pass: input site a_j records its [batch·seq, d_in] rows (unchanged),
    output site b_j becomes predict(j, rows of a_0 … a_j) at `where`."""
    inputs: list[jax.Array] = []

    def record(acts: jax.Array) -> jax.Array:
        inputs.append(acts.reshape(-1, acts.shape[-1]))
        return acts

    def predicted(j: int) -> Reconstruct:
        return _splice(lambda _: predict(j, inputs[: j + 1]), where)

    replace = {}
    for j, (site_in, site_out) in enumerate(pairs):
        replace[site_in], replace[site_out] = record, predicted(j)
    return replace


def replacement_loss(
    model: Model,
    pairs: list[tuple[str, str]],
    predict: Predict,
    token_batches: Iterable[np.ndarray],
    spliced: np.ndarray | None = None,
) -> dict[str, float]:
    """`loss_recovered` for the replacement model: every output site of pairs replaced by its prediction.

    model: a causal LM; pairs: [(input site a_j, output site b_j)] per replaced layer, in forward order;
    predict: a JAX-traceable (j, inputs) -> ŷ_j [n, d_out], inputs the [n, d_in] rows (n = batch·seq) of
    a_0 … a_j in the replaced forward pass; token_batches: held-out [batch, seq] integer arrays; spliced:
    [seq] bool, the positions replaced (all when None; zero ablation zeros every b_j at the same ones).
    Returns ce_loss_clean, ce_loss_zero_ablation, ce_loss_replacement (nats/token), ce_loss_score, kl_div
    = KL(p_clean ‖ p_replacement) and kl_div_zero_ablation (nats/token), top1_agreement, n_tokens.
    """
    _check_pairs(model, pairs)
    where = None if spliced is None else jnp.asarray(spliced, bool)
    zeros = {site_out: _splice(jnp.zeros_like, where) for _, site_out in pairs}

    def sums(m: Model, tokens: jax.Array) -> dict[str, jax.Array]:
        logits = {
            "clean": m(tokens),
            "zero_ablation": m(tokens, replace=zeros),
            "replacement": m(tokens, replace=_replacement(pairs, predict, where)),
        }
        return _scores(logits, tokens, "replacement")

    totals, _, n_tokens = _totals(model, sums, token_batches)
    return _means(totals, n_tokens, "replacement")


def embedding_cosine(
    model: Model,
    site: str,
    reconstruct: Reconstruct,
    token_batches: Iterable[np.ndarray],
    spliced: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean cosine between an encoder's pooled embeddings with and without the splice (and with zero
    ablation, for scale): {"embedding_cosine", "embedding_cosine_zero_ablation", "n_texts"}."""
    where = None if spliced is None else jnp.asarray(spliced, bool)

    def sums(m: Model, tokens: jax.Array) -> dict[str, jax.Array]:
        mask = jnp.ones(tokens.shape)
        clean = mean_pooled(m(tokens), mask)
        sae = mean_pooled(m(tokens, replace={site: _splice(reconstruct, where)}), mask)
        zero = mean_pooled(m(tokens, replace={site: _splice(jnp.zeros_like, where)}), mask)
        return {"embedding_cosine": (clean * sae).sum(), "embedding_cosine_zero_ablation": (clean * zero).sum()}

    totals, n_texts, _ = _totals(model, sums, token_batches)
    return {**{k: v / n_texts for k, v in totals.items()}, "n_texts": n_texts}
