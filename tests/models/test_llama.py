"""llama (and mistral, qwen2) against transformers' *ForCausalLM on tiny random checkpoints: logits and
every site ≤ 1e-4; the identity splice; a missing tensor; an unsupported rope type; legacy config.json."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from hf_oracle import assert_sites_match, hf_sites, save_checkpoint

from sae.models import FAMILIES, ModelError, load, site_names
from sae.models.layers import rope_frequencies

SPEC = {
    "hook_resid_pre": ("model.layers.{l}", "in"),
    "hook_attn_out": ("model.layers.{l}.self_attn", "out"),
    "hook_resid_mid": ("model.layers.{l}.post_attention_layernorm", "in"),
    "ln2.hook_normalized": ("model.layers.{l}.post_attention_layernorm", "out"),
    "mlp.hook_pre": ("model.layers.{l}.mlp.gate_proj", "out"),
    "mlp.hook_post": ("model.layers.{l}.mlp.down_proj", "in"),
    "hook_mlp_out": ("model.layers.{l}.mlp", "out"),
    "hook_resid_post": ("model.layers.{l}", "out"),
}
CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}
LAYERS, SEQ = 2, 12


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter: transformers initialises biases to 0 and norm scales to 1."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny(model_type: str = "llama", **options) -> torch.nn.Module:
    torch.manual_seed(0)
    config_cls, model_cls = CLASSES[model_type]
    sizes = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return randomized(model_cls(config_cls(**{**sizes, **options})))


LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # wavelengths 2π (interpolated), 167, … (divided by the factor)
}
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}
CASES = {
    "gqa-tied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}, None, False),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3}, None, False),
    "linear-rope": ("llama", {"rope_parameters": LINEAR}, None, False),
    "biases": ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1}, None, False),
    "untied-sharded": ("llama", {"tie_word_embeddings": False}, None, True),
    "bfloat16": ("llama", {"num_key_value_heads": 2}, torch.bfloat16, False),
    "head-dim": ("llama", {"head_dim": 16, "num_key_value_heads": 2}, None, False),  # 4 · 16 ≠ 32
    "mistral-window": ("mistral", {"sliding_window": 4, "num_key_value_heads": 2}, None, False),
    "qwen2-window": (
        "qwen2",
        {"num_key_value_heads": 2, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        None,
        False,
    ),  # q, k, v biases; layer 1 slides
}


@pytest.mark.parametrize("model_type, options, dtype, shard", CASES.values(), ids=CASES.keys())
def test_llama_matches_transformers(tmp_path, model_type, options, dtype, shard):
    hf = tiny(model_type, **options)
    save_checkpoint(hf, tmp_path, dtype, shard)
    if dtype is not None:  # the oracle reads the same rounded weights, computing in float32
        hf = type(hf).from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, 320, (2, SEQ))
    logits, sites = hf_sites(hf, tokens, SPEC, LAYERS)
    model, _ = load(tmp_path)
    assert model.config.model_type == model_type
    ours, captured = model(tokens, capture=site_names(LAYERS))
    assert np.abs(np.asarray(ours) - logits).max() <= 1e-4
    assert_sites_match(captured, sites)
    assert len(sites) == len(site_names(LAYERS))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny(num_key_value_heads=2), tmp_path_factory.mktemp("llama"))


def test_identity_splice_gives_clean_logits(checkpoint):
    model, _ = load(checkpoint)
    tokens = np.random.default_rng(1).integers(0, 320, (2, SEQ))
    clean = np.asarray(model(tokens))
    for site in ("blocks.0.hook_resid_mid", "blocks.1.mlp.hook_post"):
        assert np.array_equal(np.asarray(model(tokens, replace={site: lambda x: x})), clean)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight"):
        load(tmp_path)


def test_unsupported_rope_type_names_the_field(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="rope_parameters.rope_type='dynamic'"):
        load(tmp_path)


def test_legacy_config_fields():
    """config.json written before transformers 5: rope_theta + rope_scaling; qwen2 without layer_types."""
    base = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    old = {**base, "model_type": "llama", "rope_theta": 500000.0, "rope_scaling": scaling}
    new = {**base, "model_type": "llama", "rope_parameters": LLAMA3}
    freqs = [FAMILIES["llama"].config(c).inv_freq for c in (old, new)]
    assert freqs[0] == freqs[1] == tuple(np.asarray(rope_frequencies({"rope_parameters": LLAMA3}, 8)).tolist())
    assert not np.allclose(freqs[0], rope_frequencies({"rope_theta": 500000.0}, 8))
    qwen2 = {**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}
    assert FAMILIES["qwen2"].config(qwen2).windows == (None, None, 4, 4)
    assert FAMILIES["qwen2"].config({**qwen2, "use_sliding_window": False}).windows == (None,) * 4
    assert FAMILIES["mistral"].config({**base, "model_type": "mistral", "sliding_window": 4}).windows == (4,) * 4
    with pytest.raises(ModelError, match="num_key_value_heads"):
        FAMILIES["llama"].config({**base, "model_type": "llama", "num_key_value_heads": 3})
