"""bert against transformers' BertModel / BertForMaskedLM on tiny random checkpoints, with padding: the last
hidden state and every site ≤ 1e-4 at the real tokens."""

import numpy as np
import pytest
import torch
import transformers
from hf_oracle import assert_sites_match, hf_sites, save_checkpoint
from safetensors.numpy import load_file, save_file

from sae.models import ModelError, load, site_names
from sae.models.bert import mean_pooled

L = "encoder.layer.{l}"
SPEC = {
    "hook_resid_pre": (L, "in"),
    "hook_attn_out": (f"{L}.attention.output.dense", "out"),
    "hook_resid_mid": (f"{L}.attention.output.LayerNorm", "out"),
    "ln2.hook_normalized": (f"{L}.intermediate", "in"),
    "mlp.hook_pre": (f"{L}.intermediate.dense", "out"),
    "mlp.hook_post": (f"{L}.intermediate", "out"),
    "hook_mlp_out": (f"{L}.output.dense", "out"),
    "hook_resid_post": (L, "out"),
}
TOKENS = np.random.default_rng(0).integers(1, 320, (2, 12))
MASK = np.ones((2, 12), np.int64)
MASK[1, 8:] = 0  # row 1: 8 real tokens, then padding
TOKENS[1, 8:] = 0


def tiny_bert(cls=transformers.BertModel, **options):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        attn_implementation="eager",
        **options,
    )
    return cls(config).eval()


def real(x) -> np.ndarray:
    """The rows of [batch, seq, …] at the real tokens: [n_real, …]."""
    return np.asarray(x, np.float32)[MASK.astype(bool)]


@pytest.mark.parametrize(
    "cls, options, dtype, shard",
    [
        (transformers.BertModel, {}, None, False),  # no prefix (sentence-transformers' encoders)
        (transformers.BertForMaskedLM, {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5}, None, True),  # "bert."
        (transformers.BertModel, {}, torch.bfloat16, False),
    ],
    ids=["bertmodel", "maskedlm-gelu_new-sharded", "bfloat16"],
)
def test_bert_matches_transformers(tmp_path, cls, options, dtype, shard):
    hf = tiny_bert(cls, **options)
    save_checkpoint(hf, tmp_path, dtype, shard)
    if dtype is not None:  # the oracle reads the same rounded weights, computing in float32
        hf = cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    encoder = hf.bert if cls is transformers.BertForMaskedLM else hf
    hidden, sites = hf_sites(encoder, TOKENS, SPEC, 2, attention_mask=torch.as_tensor(MASK))
    model, _ = load(tmp_path)
    assert not model.config.causal
    ours, captured = model(TOKENS, capture=site_names(2), attention_mask=MASK)
    assert ours.shape == (2, 12, 32)
    assert np.abs(real(ours) - real(hidden)).max() <= 1e-4
    assert_sites_match({k: real(v) for k, v in captured.items()}, {k: real(v) for k, v in sites.items()})
    spliced = model(TOKENS, replace={site: (lambda x: x) for site in site_names(2)}, attention_mask=MASK)
    assert np.array_equal(np.asarray(spliced), np.asarray(ours))


def test_padding_does_not_leak(tmp_path):
    """A padded row's real tokens read exactly what the same row alone, unpadded, reads."""
    save_checkpoint(tiny_bert(), tmp_path)
    model, _ = load(tmp_path)
    padded = np.asarray(model(TOKENS, attention_mask=MASK))[1, :8]
    alone = np.asarray(model(TOKENS[1:, :8]))[0]
    assert np.abs(padded - alone).max() <= 1e-5


def test_mean_pooled():
    hidden = np.random.default_rng(1).normal(size=(2, 12, 32)).astype(np.float32)
    pooled = np.asarray(mean_pooled(hidden, MASK))
    mean = hidden[1, :8].mean(0)
    np.testing.assert_allclose(pooled[1], mean / np.linalg.norm(mean), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-6)


def test_wrong_shape_names_the_tensor(tmp_path):
    save_checkpoint(tiny_bert(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = "encoder.layer.1.intermediate.dense.weight"
    state[name] = state[name][:40].copy()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"'{name}' has shape \[40, 32\]; expected \[48, 32\]"):
        load(tmp_path)
