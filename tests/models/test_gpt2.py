"""gpt2 against transformers' GPT2LMHeadModel on tiny random checkpoints: logits and every site ≤ 1e-4."""

import numpy as np
import pytest
import torch
import transformers
from hf_oracle import assert_sites_match, hf_sites, save_checkpoint

from sae.models import load, site_names

SPEC = {
    "hook_resid_pre": ("", "hidden"),
    "hook_attn_out": ("transformer.h.{l}.attn", "out"),
    "hook_resid_mid": ("transformer.h.{l}.ln_2", "in"),
    "ln2.hook_normalized": ("transformer.h.{l}.ln_2", "out"),
    "mlp.hook_pre": ("transformer.h.{l}.mlp.c_fc", "out"),
    "mlp.hook_post": ("transformer.h.{l}.mlp.c_proj", "in"),
    "hook_mlp_out": ("transformer.h.{l}.mlp", "out"),
    "hook_resid_post": ("transformer.h.{l}", "out"),
}


def tiny_gpt2(**options) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48, **options
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize(
    "options, dtype, shard",
    [
        ({}, None, False),  # gelu_new, tied embeddings
        ({"activation_function": "relu", "tie_word_embeddings": False}, None, True),  # ours: relu, untied, sharded
        ({}, torch.bfloat16, False),
    ],
    ids=["tied", "relu-untied-sharded", "bfloat16"],
)
def test_gpt2_matches_transformers(tmp_path, options, dtype, shard):
    hf = tiny_gpt2(**options)
    save_checkpoint(hf, tmp_path, dtype, shard)
    if dtype is not None:  # the oracle reads the same rounded weights, computing in float32
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 320, (2, 12))
    logits, sites = hf_sites(hf, tokens, SPEC, 2)
    model, tokenizer = load(tmp_path)
    ours, captured = model(tokens, capture=site_names(2))
    assert np.abs(np.asarray(ours) - logits).max() <= 1e-4
    assert_sites_match(captured, sites)
    assert tokenizer.vocab_size <= 320
