"""Our step-metric keys and SAELens's W&B keys, so SAELens dashboards carry over."""

from __future__ import annotations

import math
from collections.abc import Mapping

from sae.architectures import FAMILIES

# Our step-metric keys -> SAELens's W&B keys, from jbloomAus/SAELens sae_lens/training/sae_trainer.py
# (`_build_train_step_log_dict`, `_build_sparsity_log_dict`), the loss names of sae_lens/saes/*.py
# (`TrainingSAE.training_forward_pass`: mse_loss; standard: l1_loss; topk/batchtopk/gated:
# auxiliary_reconstruction_loss; jumprelu: l0_loss) and `TrainingSAE.log_histograms` (weights/W_dec_norms).
# SAELens logs the sparsity coefficient as details/{l1|l0}_coefficient and dead latents as a count.
SAELENS_NAMES: dict[str, str] = {
    "loss": "losses/overall_loss",
    "mse_loss": "losses/mse_loss",
    "l1_loss": "losses/l1_loss",
    "auxk_loss": "losses/auxiliary_reconstruction_loss",  # TopK family's AuxK
    "gate_aux_loss": "losses/auxiliary_reconstruction_loss",  # Gated SAE's via-gate reconstruction
    "l0_loss": "losses/l0_loss",  # JumpReLU
    "explained_variance": "metrics/explained_variance",  # 1 − FVU (SAELens: 1 − Σ‖x−x̂‖² / Σ‖x−x̄‖²)
    "l0": "metrics/l0",
    "dead_features": "sparsity/dead_features",  # count = round(dead_fraction · d_sae)
    "lr": "details/current_learning_rate",
    "sparsity_coefficient": "details/l1_coefficient",  # by family: coefficient_name
    "tokens": "details/n_training_tokens",
    # histograms (log_histograms)
    "feature_density_log10": "plots/feature_density_line_chart",
    "decoder_norm": "weights/W_dec_norms",
}
# Ours, where SAELens has no equivalent.
OWN_NAMES: dict[str, str] = {
    "fvu": "metrics/fvu",
    "dead_fraction": "sparsity/dead_fraction",
    "tokens_per_s": "metrics/tokens_per_s",
    "step_path": "details/step_path",  # which path the step took, where a family has several (`SAE.route`)
}
WANDB_NAMES: dict[str, str] = {**SAELENS_NAMES, **OWN_NAMES}


def coefficient_name(sae_name: str | None) -> str | None:
    """SAELens's W&B key of a family's sparsity coefficient, `details/{field}` of its `get_coefficients()`
    (details/l1_coefficient, details/l0_coefficient); None for a family without one (the TopK family)."""
    if sae_name not in FAMILIES:
        return SAELENS_NAMES["sparsity_coefficient"]
    field = FAMILIES[sae_name].sparsity
    return None if field is None else f"details/{field}"


def wandb_name(key: str, sae_name: str | None = None) -> str | None:
    """W&B key of one of our metric keys (None: not logged); unknown keys go under metrics/, keys with a
    '/' pass through."""
    if key == "sparsity_coefficient":
        return coefficient_name(sae_name)
    if "/" in key:
        return key
    return WANDB_NAMES.get(key, f"metrics/{key}")


def to_wandb_metrics(
    metrics: Mapping[str, float], sae_name: str | None = None, d_sae: int | None = None
) -> dict[str, float]:
    """Rename a step's metrics for W&B, adding explained_variance (1 − fvu) and the dead-latent count.
    A "step" entry is dropped: it is W&B's own step."""
    values = {k: float(v) for k, v in metrics.items() if k != "step"}
    if "fvu" in values and "explained_variance" not in values:
        values["explained_variance"] = 1.0 - values["fvu"]
    if "dead_fraction" in values and d_sae and "dead_features" not in values and math.isfinite(values["dead_fraction"]):
        values["dead_features"] = float(round(values["dead_fraction"] * d_sae))
    names = {k: wandb_name(k, sae_name) for k in values}
    return {names[k]: v for k, v in values.items() if names[k] is not None}
