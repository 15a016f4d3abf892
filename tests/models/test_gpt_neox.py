"""gpt_neox against transformers' GPTNeoXForCausalLM on tiny random checkpoints: logits and every site ≤ 1e-4."""

import json

import numpy as np
import pytest
import torch
import transformers
from hf_oracle import assert_sites_match, hf_sites, save_checkpoint
from safetensors.numpy import load_file, save_file

from sae.models import ModelError, load, site_names

L = "gpt_neox.layers.{l}"
SPEC = {
    "hook_resid_pre": (L, "in"),
    "hook_attn_out": (f"{L}.attention", "out"),
    "ln2.hook_normalized": (f"{L}.post_attention_layernorm", "out"),
    "mlp.hook_pre": (f"{L}.mlp.dense_h_to_4h", "out"),
    "mlp.hook_post": (f"{L}.mlp.dense_4h_to_h", "in"),
    "hook_mlp_out": (f"{L}.mlp", "out"),
    "hook_resid_post": (L, "out"),
}
SEQUENTIAL = {**SPEC, "hook_resid_mid": (f"{L}.post_attention_layernorm", "in")}
TOKENS = np.random.default_rng(0).integers(0, 320, (2, 12))


def tiny_neox(**options) -> transformers.GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # d_head 16
        intermediate_size=96,
        max_position_embeddings=32,
        attn_implementation="eager",
        **options,
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


def oracle(hf, parallel: bool) -> tuple[np.ndarray, dict]:
    logits, sites = hf_sites(hf, TOKENS, SPEC if parallel else SEQUENTIAL, 2)
    if parallel:  # transformers never forms x + attn_out on its own: the site is that sum of its two sites
        for layer in range(2):
            b = f"blocks.{layer}"
            sites[f"{b}.hook_resid_mid"] = sites[f"{b}.hook_resid_pre"] + sites[f"{b}.hook_attn_out"]
    return logits, sites


@pytest.mark.parametrize(
    "options, dtype, shard",
    [
        ({"use_parallel_residual": True, "rotary_pct": 0.25}, None, False),  # Pythia's layout
        ({"use_parallel_residual": False, "rotary_pct": 0.5, "attention_bias": False}, None, True),
        ({"rotary_pct": 1.0, "tie_word_embeddings": True}, torch.bfloat16, False),
    ],
    ids=["parallel-rot0.25", "sequential-rot0.5-nobias-sharded", "full-rotary-tied-bfloat16"],
)
def test_gpt_neox_matches_transformers(tmp_path, options, dtype, shard):
    hf = tiny_neox(**options)
    save_checkpoint(hf, tmp_path, dtype, shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    if dtype is not None:  # the oracle reads the same rounded weights, computing in float32
        hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    logits, sites = oracle(hf, hf.config.use_parallel_residual)
    model, _ = load(tmp_path)
    assert len(model.config.inv_freq) == int(16 * options["rotary_pct"]) // 2
    ours, captured = model(TOKENS, capture=site_names(2))
    assert np.abs(np.asarray(ours) - logits).max() <= 1e-4
    assert_sites_match(captured, sites)
    clean = np.asarray(ours)
    spliced = model(TOKENS, replace={site: (lambda x: x) for site in site_names(2)})
    assert np.array_equal(np.asarray(spliced), clean)


def test_pythia_style_config(tmp_path):
    """Pythia's config.json (rotary_pct, rotary_emb_base at the top, no rope_parameters) reads the same."""
    hf = tiny_neox(rotary_pct=0.25, rope_parameters={"rope_theta": 500.0})
    save_checkpoint(hf, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.25  # what transformers 5 writes
    del config["rope_parameters"]
    config.update(rotary_pct=0.25, rotary_emb_base=500, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.rope_parameters["rope_theta"] == 500
    logits, sites = oracle(hf, True)
    model, _ = load(tmp_path)
    ours, captured = model(TOKENS, capture=site_names(2))
    assert np.abs(np.asarray(ours) - logits).max() <= 1e-4
    assert_sites_match(captured, sites)
    # The parallel MLP reads the block input, not resid_mid: a replace there reaches resid_post only.
    _, zeroed = model(
        TOKENS,
        capture=["blocks.0.ln2.hook_normalized", "blocks.0.hook_resid_post"],
        replace={"blocks.0.hook_resid_mid": lambda x: x * 0},
    )
    assert np.array_equal(np.asarray(zeroed["blocks.0.ln2.hook_normalized"]), captured["blocks.0.ln2.hook_normalized"])
    assert np.array_equal(np.asarray(zeroed["blocks.0.hook_resid_post"]), captured["blocks.0.hook_mlp_out"])


def test_wrong_shape_names_the_tensor(tmp_path):
    save_checkpoint(tiny_neox(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    state[name] = state[name][:, :32].copy()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"'{name}' has shape \[192, 32\]; expected \[192, 64\]"):
        load(tmp_path)
