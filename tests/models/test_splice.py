"""Splicing at a site, for any model: loss recovered and embedding cosine against transformers with a hook
doing the same replacement, or a NumPy second path; capture and replace leave everything upstream alone."""

import numpy as np
import pytest
import torch
import transformers
from hf_oracle import save_checkpoint

from sae.models import ModelError, jitted, load, site_names
from sae.models.splice import embedding_cosine, loss_recovered

TOKENS = np.random.default_rng(0).integers(0, 320, (3, 12))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=320, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    path = save_checkpoint(hf, tmp_path_factory.mktemp("gpt2"))
    return load(path)[0], hf


def torch_loss(hf, tokens, hook=None) -> tuple[float, np.ndarray]:
    """transformers' mean next-token loss and logits, with `hook` (module, fn) replacing a module's output."""
    handle = hook[0].register_forward_hook(lambda m, a, out: hook[1](out)) if hook else None
    with torch.no_grad():
        t = torch.as_tensor(tokens, dtype=torch.long)
        out = hf(t, labels=t)
    if handle:
        handle.remove()
    return float(out.loss), out.logits.numpy().astype(np.float64)


def test_identity_splice_gives_exactly_the_clean_loss(gpt2):
    model, hf = gpt2
    out = loss_recovered(model, "blocks.1.mlp.hook_post", lambda x: x, [TOKENS])
    assert out["ce_loss_sae"] == out["ce_loss_clean"] and out["kl_div"] == 0.0 and out["ce_loss_score"] == 1.0
    assert out["ce_loss_clean"] == pytest.approx(torch_loss(hf, TOKENS)[0], rel=1e-5)
    assert out["n_tokens"] == 3 * 11


@pytest.mark.parametrize("layer", [0, 1])
def test_zero_ablation_matches_transformers_with_a_zeroing_hook(gpt2, layer):
    model, hf = gpt2
    out = loss_recovered(model, f"blocks.{layer}.hook_mlp_out", lambda x: 0 * x, [TOKENS[:2], TOKENS[2:]])
    zero, _ = torch_loss(hf, TOKENS, (hf.transformer.h[layer].mlp, torch.zeros_like))
    assert out["ce_loss_zero_ablation"] == pytest.approx(zero, rel=1e-5)
    assert out["ce_loss_sae"] == pytest.approx(zero, rel=1e-5) and out["ce_loss_score"] == pytest.approx(0, abs=1e-4)


def test_kl_and_score_match_a_second_path(gpt2):
    """A perturbed reconstruction: CE losses and KL from transformers' logits with the same change, in NumPy."""
    model, hf = gpt2
    out = loss_recovered(model, "blocks.0.hook_mlp_out", lambda x: 0.5 * x + 0.1, [TOKENS])
    mlp = hf.transformer.h[0].mlp
    l_clean, clean = torch_loss(hf, TOKENS)
    l_sae, spliced = torch_loss(hf, TOKENS, (mlp, lambda o: 0.5 * o + 0.1))
    l_zero, _ = torch_loss(hf, TOKENS, (mlp, torch.zeros_like))

    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    lp, lq = log_softmax(clean[:, :-1]), log_softmax(spliced[:, :-1])
    assert out["kl_div"] == pytest.approx((np.exp(lp) * (lp - lq)).sum(-1).mean(), rel=1e-3)
    assert out["ce_loss_sae"] == pytest.approx(l_sae, rel=1e-5)
    assert out["ce_loss_score"] == pytest.approx((l_zero - l_sae) / (l_zero - l_clean), rel=1e-3)


def test_spliced_positions_only(gpt2):
    """`spliced` limits the replacement to chosen positions: zeros at position 0 only is a different loss
    from zeros everywhere, and all-False is the clean model."""
    model, _ = gpt2
    site, zero = "blocks.0.hook_resid_post", lambda x: 0 * x
    first = np.zeros(12, bool)
    first[0] = True
    some = loss_recovered(model, site, zero, [TOKENS], spliced=first)
    none = loss_recovered(model, site, zero, [TOKENS], spliced=np.zeros(12, bool))
    assert none["ce_loss_zero_ablation"] == none["ce_loss_clean"]
    assert some["ce_loss_zero_ablation"] != loss_recovered(model, site, zero, [TOKENS])["ce_loss_zero_ablation"]


def test_replace_changes_only_the_site_and_what_follows(gpt2):
    model, _ = gpt2
    order = site_names(2)
    at = order.index("blocks.0.mlp.hook_post")
    clean = jitted(model, capture=order)(TOKENS)[1]
    spliced = jitted(model, capture=order, replace={order[at]: lambda a: 2 * a + 1})(TOKENS)[1]
    for site in order[:at]:
        np.testing.assert_array_equal(spliced[site], clean[site], err_msg=site)
    np.testing.assert_allclose(spliced[order[at]], 2 * clean[order[at]] + 1, rtol=1e-6)
    for site in order[at + 1 :]:
        if site != "blocks.0.hook_resid_mid":
            assert not np.allclose(spliced[site], clean[site]), site
    with pytest.raises(ModelError, match="has shape"):
        model(TOKENS, replace={order[at]: lambda a: a[..., :3]})
    with pytest.raises(ModelError, match=r"'blocks.2.hook_mlp_out' is not a site of this model; sites: blocks.<0..1>"):
        model(TOKENS, capture=["blocks.2.hook_mlp_out"])
    with pytest.raises(ModelError, match="exceed the model's 16 positions"):
        model(np.zeros((1, 17), int))


def test_embedding_cosine_of_an_encoder(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    model = load(save_checkpoint(transformers.BertModel(config).eval(), tmp_path))[0]
    site = "blocks.1.hook_resid_post"
    same = embedding_cosine(model, site, lambda x: x, [TOKENS])
    assert same["embedding_cosine"] == pytest.approx(1.0, abs=1e-6) and same["n_texts"] == 3
    half = embedding_cosine(model, site, lambda x: 0.5 * x, [TOKENS])  # the last block's output, scaled: same mean
    assert half["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    noisy = embedding_cosine(model, "blocks.0.hook_resid_post", lambda x: x[:, ::-1], [TOKENS])
    assert noisy["embedding_cosine"] < 0.99 and noisy["embedding_cosine_zero_ablation"] < 1
