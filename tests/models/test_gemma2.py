"""gemma2 against transformers' Gemma2ForCausalLM on tiny random checkpoints: logits and every site ≤ 1e-4
(sliding and global layers, both soft-caps, grouped-query attention); the identity splice."""

import json

import numpy as np
import pytest
import torch
import transformers
from hf_oracle import assert_sites_match, hf_sites, save_checkpoint

from sae.models import FAMILIES, ModelError, load, site_names

SPEC = {
    "hook_resid_pre": ("model.layers.{l}", "in"),
    "hook_attn_out": ("model.layers.{l}.post_attention_layernorm", "out"),
    "hook_resid_mid": ("model.layers.{l}.pre_feedforward_layernorm", "in"),
    "ln2.hook_normalized": ("model.layers.{l}.pre_feedforward_layernorm", "out"),
    "mlp.hook_pre": ("model.layers.{l}.mlp.gate_proj", "out"),
    "mlp.hook_post": ("model.layers.{l}.mlp.down_proj", "in"),
    "hook_mlp_out": ("model.layers.{l}.post_feedforward_layernorm", "out"),
    "hook_resid_post": ("model.layers.{l}", "out"),
}
LAYERS, SEQ = 3, 12


def tiny_gemma2(**options) -> transformers.Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        **{
            "vocab_size": 320,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "max_position_embeddings": 64,
            "sliding_window": 4,
            # small caps, so that tanh bends the tiny model's scores and logits
            "attn_logit_softcapping": 0.5,
            "final_logit_softcapping": 1.0,
            "attn_implementation": "eager",
            **options,
        }
    )
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():  # transformers initialises the norms' γ − 1 and the biases to 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


CASES = {
    "window-softcaps-gqa": ({}, None, False),
    "untied-bias-sharded": ({"tie_word_embeddings": False, "attention_bias": True}, None, True),
    "bfloat16-no-caps": ({"attn_logit_softcapping": None, "final_logit_softcapping": None}, torch.bfloat16, False),
}


@pytest.mark.parametrize("options, dtype, shard", CASES.values(), ids=CASES.keys())
def test_gemma2_matches_transformers(tmp_path, options, dtype, shard):
    hf = tiny_gemma2(**options)
    save_checkpoint(hf, tmp_path, dtype, shard)
    # transformers 5 writes layer_types: layers 0, 2 attend within the window, layer 1 globally
    assert json.loads((tmp_path / "config.json").read_text())["layer_types"][:2] == [
        "sliding_attention",
        "full_attention",
    ]
    if dtype is not None:  # the oracle reads the same rounded weights, computing in float32
        hf = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    tokens = np.random.default_rng(0).integers(0, 320, (2, SEQ))
    logits, sites = hf_sites(hf.eval(), tokens, SPEC, LAYERS)
    model, _ = load(tmp_path)
    assert model.config.windows == (4, None, 4)
    ours, captured = model(tokens, capture=site_names(LAYERS))
    assert np.abs(np.asarray(ours) - logits).max() <= 1e-4
    assert_sites_match(captured, sites)
    assert len(sites) == len(site_names(LAYERS))


def test_identity_splice_gives_clean_logits(tmp_path):
    model, _ = load(save_checkpoint(tiny_gemma2(), tmp_path))
    tokens = np.random.default_rng(1).integers(0, 320, (2, SEQ))
    clean = np.asarray(model(tokens))
    for site in ("blocks.0.hook_attn_out", "blocks.2.mlp.hook_pre"):
        assert np.array_equal(np.asarray(model(tokens, replace={site: lambda x: x})), clean)


def test_config_without_layer_types():
    """Older gemma2 config.json files have no layer_types: even layers slide (transformers' default)."""
    c = {
        "model_type": "gemma2",
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "head_dim": 16,
        "max_position_embeddings": 64,
        "sliding_window": 4,
    }
    config = FAMILIES["gemma2"].config(c)
    assert config.windows == (4, None, 4, None)
    assert config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings
    with pytest.raises(ModelError, match="hidden_activation"):
        FAMILIES["gemma2"].config({**c, "hidden_activation": "tanh"})
    with pytest.raises(ModelError, match="layer_types"):
        FAMILIES["gemma2"].config({**c, "layer_types": ["chunked_attention"] * 4})
