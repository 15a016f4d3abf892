"""The replacement model's loss: a tiny GPT-2 with its MLP outputs predicted from the MLP inputs of the same,
replaced forward pass, against a second path that runs the replacements layer by layer with explicit
replace dicts and scores the logits in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_oracle import tiny_gpt2

from sae.models import ModelError, load
from sae.models.splice import loss_recovered, replacement_loss

TOKENS = np.random.default_rng(0).integers(0, 320, (3, 12))
PAIRS = [(f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out") for layer in range(2)]
W = np.random.default_rng(1).normal(0, 0.004, (2, 2, 32, 32)).astype(np.float32)  # W[i, j]: input i -> ŷ_j


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tiny_gpt2(tmp_path_factory.mktemp("gpt2"), n_layer=2, n_positions=16))[0]


def cross_layer(j, inputs):
    """A CLT-like predictor: ŷ_j = Σ_{i ≤ j} inputs[i] W[i, j]."""
    return sum(x @ W[i, j] for i, x in enumerate(inputs))


def zero(j, inputs):
    return jnp.zeros_like(inputs[j])


def log_softmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def layer_by_layer(model, predict, tokens, where) -> np.ndarray:
    """The replaced model's logits by a second path: one forward per pair, each capturing the next input site
    with the outputs so far fixed to constants (numpy predictions at `where`, the site's own activation elsewhere)."""
    fixed, inputs = {}, []
    for j, (site_in, site_out) in enumerate(PAIRS):
        _, got = model(tokens, capture=[site_in, site_out], replace=fixed)
        inputs.append(np.asarray(got[site_in]).reshape(-1, 32))
        y = np.asarray(predict(j, inputs)).reshape(got[site_out].shape)
        y = jnp.asarray(np.where(where[None, :, None], y, got[site_out]))
        fixed[site_out] = lambda a, y=y: y
    return np.asarray(model(tokens, replace=fixed))


def test_the_true_mlps_give_the_clean_model(model):
    """predict = the model's own MLP on inputs[j]: the replacement model is the model."""

    def mlp(j, inputs):
        block = model.h[j]
        return block.mlp_proj(block.act(block.c_fc(inputs[j])))

    out = replacement_loss(model, PAIRS, mlp, [TOKENS[:2], TOKENS[2:]])
    assert out["ce_loss_replacement"] == pytest.approx(out["ce_loss_clean"], rel=1e-6)
    assert out["ce_loss_score"] == pytest.approx(1, abs=1e-4) and out["kl_div"] < 1e-6
    assert out["top1_agreement"] == 1 and out["n_tokens"] == 3 * 11


def test_a_zero_predictor_is_zero_ablation_and_matches_loss_recovered(model):
    one = replacement_loss(model, PAIRS[:1], zero, [TOKENS])
    assert one["ce_loss_replacement"] == one["ce_loss_zero_ablation"] and one["ce_loss_score"] == 0
    assert one["kl_div"] == one["kl_div_zero_ablation"]
    sae = loss_recovered(model, PAIRS[0][1], jnp.zeros_like, [TOKENS])
    for key in ("ce_loss_clean", "ce_loss_zero_ablation", "kl_div", "kl_div_zero_ablation", "top1_agreement"):
        assert one[key] == pytest.approx(sae[key], rel=1e-6), key
    both = replacement_loss(model, PAIRS, zero, [TOKENS])
    assert both["ce_loss_replacement"] == both["ce_loss_zero_ablation"] != one["ce_loss_zero_ablation"]


@pytest.mark.parametrize("first_spliced", [True, False])
def test_scores_match_a_layer_by_layer_second_path(model, first_spliced):
    """A cross-layer predictor (errors compound through layer 1's input), spliced everywhere or not at 0."""
    where = np.ones(12, bool)
    where[0] = first_spliced
    out = replacement_loss(model, PAIRS, cross_layer, [TOKENS], spliced=None if first_spliced else where)
    replaced = layer_by_layer(model, cross_layer, TOKENS, where)
    lp, lq = (log_softmax(a[:, :-1]) for a in (np.asarray(model(TOKENS)), replaced))
    ce = -np.take_along_axis(lq, TOKENS[:, 1:, None], -1).mean()
    top1 = (lp.argmax(-1) == lq.argmax(-1)).mean()
    assert out["ce_loss_replacement"] == pytest.approx(ce, rel=1e-5)
    assert out["kl_div"] == pytest.approx((np.exp(lp) * (lp - lq)).sum(-1).mean(), rel=1e-4)
    assert out["top1_agreement"] == pytest.approx(top1, abs=1e-9) and 0 < top1 < 1
    gap = out["ce_loss_zero_ablation"] - out["ce_loss_clean"]
    assert out["ce_loss_score"] == pytest.approx((out["ce_loss_zero_ablation"] - ce) / gap, rel=1e-4)


def test_later_inputs_are_the_replaced_models_activations(model):
    """With layer 0's output zeroed, predict(1, ·) sees layer 1's MLP input of that zeroed model."""
    seen = []

    def spy(j, inputs):
        if j == 1:
            jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]), *inputs)
        return jnp.zeros_like(inputs[j])

    replacement_loss(model, PAIRS, spy, [TOKENS])
    ((a0, a1),) = seen
    _, clean = model(TOKENS, capture=[PAIRS[0][0], PAIRS[1][0]])
    _, ablated = model(TOKENS, capture=[PAIRS[1][0]], replace={PAIRS[0][1]: jnp.zeros_like})
    np.testing.assert_allclose(a0, np.asarray(clean[PAIRS[0][0]]).reshape(-1, 32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a1, np.asarray(ablated[PAIRS[1][0]]).reshape(-1, 32), rtol=1e-5, atol=1e-6)
    assert not np.allclose(a1, np.asarray(clean[PAIRS[1][0]]).reshape(-1, 32), atol=1e-3)


def test_nothing_spliced_is_the_clean_model_and_pairs_are_checked(model):
    out = replacement_loss(model, PAIRS, cross_layer, [TOKENS], spliced=np.zeros(12, bool))
    assert out["ce_loss_replacement"] == out["ce_loss_clean"] and out["kl_div"] == 0 and out["top1_agreement"] == 1
    with pytest.raises(ModelError, match="forward order"):
        replacement_loss(model, [PAIRS[1], PAIRS[0]], zero, [TOKENS])
    with pytest.raises(ModelError, match="forward order"):
        replacement_loss(model, [(PAIRS[0][1], PAIRS[0][0])], zero, [TOKENS])
    with pytest.raises(ModelError, match="not a site of this model"):
        replacement_loss(model, [("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out")], zero, [TOKENS])


def test_loss_recovered_reports_top1_agreement(model):
    site, fn = "blocks.0.hook_mlp_out", lambda x: 0.5 * x + 0.1
    assert loss_recovered(model, site, lambda x: x, [TOKENS])["top1_agreement"] == 1
    out = loss_recovered(model, site, fn, [TOKENS])
    clean, spliced = np.asarray(model(TOKENS))[:, :-1], np.asarray(model(TOKENS, replace={site: fn}))[:, :-1]
    top1 = (clean.argmax(-1) == spliced.argmax(-1)).mean()
    assert out["top1_agreement"] == pytest.approx(top1, abs=1e-9) and top1 < 1
