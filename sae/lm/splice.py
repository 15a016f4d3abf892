"""Loss recovered: the LM's next-token loss with an SAE's reconstruction spliced in at a site.

With L(·) the mean next-token cross-entropy (nats/token) on held-out text,

    ce_loss_score = (L_zero − L_sae) / (L_zero − L_clean)          (Bricken et al. 2023, "loss recovered")
    kl_div        = mean over positions of KL(p_clean ‖ p_sae) = Σ_v p_clean(v) (log p_clean(v) − log p_sae(v))

where L_clean is the unmodified model's loss, L_zero the loss with the site's activation replaced by zeros
(zero ablation) and L_sae the loss with it replaced by the reconstruction x̂ = reconstruct(x), applied to
every position. Losses and KL are taken at the positions that have a next token (0 … seq − 2).
`store_loss_recovered` finds the LM, the site and the validation text from an activation store written
by `sae-cache source=lm`, so `sae-train` can report these for an SAE trained on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae.data.store import Store
from sae.lm.model import TransformerLM, resolve_site, token_losses
from sae.lm.text import tiled_windows
from sae.lm.train import corpus_of, load_lm

Reconstruct = Callable[[jax.Array], jax.Array]


def loss_recovered(
    lm: TransformerLM, site: str, reconstruct: Reconstruct, token_batches: Iterable[np.ndarray]
) -> dict[str, float]:
    """CE losses clean / zero-ablated / spliced, the CE-loss score and the KL to the clean model.

    lm: the model; site: e.g. "mlp_post" (or "blocks/<l>/<site>"); reconstruct: a JAX-traceable map
    x [n, d] -> x̂ [n, d] (e.g. `sae.export.load_sae(dir)`), applied to the site's [batch·seq, d] rows;
    token_batches: held-out [batch, seq] integer arrays (seq ≤ n_ctx).
    Returns ce_loss_clean, ce_loss_zero_ablation, ce_loss_sae (nats/token), ce_loss_score, kl_div and
    kl_div_zero_ablation (nats/token), n_tokens (positions scored).
    """
    site = resolve_site(site, lm.cfg.n_layers)
    graphdef, state = nnx.split(lm)

    def spliced(acts: jax.Array) -> jax.Array:
        return jnp.asarray(reconstruct(acts.reshape(-1, acts.shape[-1]))).reshape(acts.shape).astype(acts.dtype)

    @jax.jit
    def sums(state: nnx.State, tokens: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, state)
        logits = {
            "clean": model(tokens),
            "zero_ablation": model(tokens, {site: jnp.zeros_like}),
            "sae": model(tokens, {site: spliced}),
        }
        logp = {k: jax.nn.log_softmax(v[:, :-1].astype(jnp.float32), axis=-1) for k, v in logits.items()}
        p_clean = jnp.exp(logp["clean"])
        out = {f"ce_loss_{k}": token_losses(v, tokens).sum() for k, v in logits.items()}
        out["kl_div"] = (p_clean * (logp["clean"] - logp["sae"])).sum()
        out["kl_div_zero_ablation"] = (p_clean * (logp["clean"] - logp["zero_ablation"])).sum()
        return out

    totals: dict[str, float] = {}
    n_tokens = 0
    for batch in token_batches:
        tokens = jnp.asarray(np.asarray(batch), jnp.int32)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"token batches must be [batch, seq ≥ 2] arrays; got shape {tuple(tokens.shape)}")
        for k, v in sums(state, tokens).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n_tokens += tokens.shape[0] * (tokens.shape[1] - 1)
    if not n_tokens:
        raise ValueError("loss_recovered needs at least one token batch")
    out = {k: v / n_tokens for k, v in totals.items()}
    out["ce_loss_score"] = (out["ce_loss_zero_ablation"] - out["ce_loss_sae"]) / (
        out["ce_loss_zero_ablation"] - out["ce_loss_clean"]
    )
    out["n_tokens"] = n_tokens
    return out


def lm_provenance(store: str | Path | dict) -> dict | None:
    """The LM provenance of a store (its directory, or its manifest dict), or None if not from `source=lm`."""
    if not isinstance(store, dict):
        store = {"provenance": Store(store).provenance}
    provenance = store.get("provenance", {})
    return provenance if provenance.get("source") == "lm" else None


def lm_eval_data(
    store: str | Path | dict, n_sequences: int = 256, batch_size: int = 32, seed: int = 0
) -> tuple[TransformerLM, str, list[np.ndarray]]:
    """(LM, site, validation token batches [batch_size, n_ctx]) for a store written by `sae-cache source=lm`.

    The LM is its run's checkpoint of the step the store was cached from; the batches are up to
    n_sequences non-overlapping windows of the run's validation files (`tiled_windows(…, seed)`).
    """
    provenance = lm_provenance(store)
    if provenance is None:
        raise ValueError(
            f"{store if not isinstance(store, dict) else 'the manifest'} was not cached from an LM "
            "(its provenance source is not 'lm')"
        )
    lm, tokenizer, lm_config = load_lm(provenance["model"], step=provenance.get("model_step"))
    val = corpus_of(lm_config).tokens("val", tokenizer)
    n_ctx = int(provenance.get("context_length", lm.cfg.n_ctx))
    windows = tiled_windows(val, n_ctx, min(n_sequences, len(val) // n_ctx), seed)
    return lm, provenance["site"], [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


def store_loss_recovered(
    store: str | Path | dict, reconstruct: Reconstruct, n_sequences: int = 256, batch_size: int = 32
) -> dict[str, float]:
    """`loss_recovered` of `reconstruct` at the site of an LM store, on its LM's validation text."""
    lm, site, batches = lm_eval_data(store, n_sequences, batch_size)
    return loss_recovered(lm, site, reconstruct, batches)
