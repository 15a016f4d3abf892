"""Capturing a sown intermediate of a Flax NNX module and caching it into an activation store."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from sae.data.model_source import cache_model, capture_site
from sae.data.store import Store, StoreError, StoreWriter

VOCAB, D_MODEL, D_MLP, SEQ = 50, 8, 16, 16


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D_MODEL, D_MLP, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.gelu(self.up(x))
        self.sow(nnx.Intermediate, "mlp_post", h)
        return h


class TinyModel(nnx.Module):
    """Embedding, one MLP layer (sows "mlp_post" from a submodule) and an unembedding."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.mlp = MLP(rngs)
        self.unembed = nnx.Linear(D_MLP, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        self.sow(nnx.Intermediate, "resid_pre", x)
        return self.unembed(self.mlp(x))


@pytest.fixture(scope="module")
def model():
    return TinyModel(nnx.Rngs(0))


@pytest.fixture(scope="module")
def fn(model):
    return capture_site(model, "mlp_post")


def tokens(n_seq: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n_seq, SEQ)).astype(np.int32)


def batches(toks: np.ndarray, size: int):
    return (toks[i : i + size] for i in range(0, len(toks), size))


def by_hand(model: TinyModel, toks: np.ndarray) -> np.ndarray:
    """mlp_post from the parameters in NumPy: gelu (tanh form) of embed @ W + b."""
    x = np.asarray(model.embed.embedding[...])[toks] @ np.asarray(model.mlp.up.kernel[...])
    x = x + np.asarray(model.mlp.up.bias[...])
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def writer(path, shard_rows: int, with_tokens: bool = True) -> StoreWriter:
    return StoreWriter(
        path,
        d_in=D_MLP,
        dtype="float32",
        shard_rows=shard_rows,
        with_tokens=with_tokens,
        provenance={"source": "test", "site": "mlp_post"},
    )


def test_capture_matches_hand_computation(model, fn):
    toks = tokens()
    acts = np.asarray(fn(toks))
    assert acts.shape == (12, SEQ, D_MLP)
    np.testing.assert_allclose(acts, by_hand(model, toks), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(capture_site(model, "mlp/mlp_post")(toks)), acts)  # full path
    np.testing.assert_array_equal(
        np.asarray(capture_site(model, "resid_pre")(toks)), np.asarray(model.embed.embedding[...])[toks]
    )
    assert not nnx.to_flat_state(nnx.state(model, nnx.Intermediate))  # the module is left as it was


def test_unknown_site_names_it_and_the_sown_sites(model):
    with pytest.raises(ValueError, match=r"'mlp_pre'.*never sown.*mlp/mlp_post.*resid_pre"):
        capture_site(model, "mlp_pre")(tokens(2))


def test_cache_rows_tokens_positions(model, fn, tmp_path):
    toks = tokens()
    lines = []
    with writer(tmp_path / "s", shard_rows=64) as w:
        summary = cache_model(fn, batches(toks, 5), w, n_sequences=12, log_every_s=0.0, log=lines.append)
    store = Store(tmp_path / "s")
    assert store.n_rows == summary["rows"] == summary["total_rows"] == 12 * SEQ
    assert [s.rows for s in store.shards] == [64, 64, 64]
    np.testing.assert_array_equal(store.read_rows(0, store.n_rows), np.asarray(fn(toks)).reshape(-1, D_MLP))
    ids, positions = store.read_tokens(0, store.n_rows)
    np.testing.assert_array_equal(ids, toks.reshape(-1))
    np.testing.assert_array_equal(positions, np.tile(np.arange(SEQ), 12))
    assert "rows/s" in lines[0] and "ETA" in lines[0] and "/192 rows" in lines[-1]


def test_skip_first_position_and_n_sequences(model, fn, tmp_path):
    toks = tokens()
    with writer(tmp_path / "s", shard_rows=3 * (SEQ - 1)) as w:
        summary = cache_model(fn, batches(toks, 4), w, n_sequences=10, skip_first_position=True, log=lambda s: None)
    store = Store(tmp_path / "s")
    assert store.n_rows == summary["rows"] == 10 * (SEQ - 1)
    expected = by_hand(model, toks[:10])[:, 1:].reshape(-1, D_MLP)
    np.testing.assert_allclose(store.read_rows(0, store.n_rows), expected, rtol=1e-5, atol=1e-6)
    ids, positions = store.read_tokens(0, store.n_rows)
    np.testing.assert_array_equal(ids, toks[:10, 1:].reshape(-1))
    np.testing.assert_array_equal(positions, np.tile(np.arange(1, SEQ), 10))


def test_resume_gives_the_uninterrupted_store(fn, tmp_path):
    toks = tokens()
    with writer(tmp_path / "whole", shard_rows=2 * SEQ) as w:
        cache_model(fn, batches(toks, 4), w, log=lambda s: None)
    # A run killed after 7 sequences: 3 complete shards of 2 sequences, the 7th sequence still pending.
    cache_model(fn, batches(toks, 4), writer(tmp_path / "cut", shard_rows=2 * SEQ), n_sequences=7, log=lambda s: None)
    with writer(tmp_path / "cut", shard_rows=2 * SEQ) as w:
        assert w.rows_written == 6 * SEQ  # resumes in the middle of the second batch
        summary = cache_model(fn, batches(toks, 4), w, log=lambda s: None)
    assert summary["resumed_rows"] == 6 * SEQ and summary["rows"] == 6 * SEQ and summary["sequences"] == 12
    whole, cut = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "cut"))
    assert cut["shards"] == whole["shards"]  # names, rows and checksums
    for side in ("tokens", "positions"):
        for i in range(len(whole["shards"])):
            name = f"shard_{i:05d}.{side}.npy"
            assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_shard_rows_must_hold_whole_sequences(fn, tmp_path):
    with pytest.raises(StoreError, match=r"shard_rows=50 is not a multiple of the 16 rows per sequence"):
        cache_model(fn, batches(tokens(), 4), writer(tmp_path / "s", shard_rows=50), log=lambda s: None)
    with pytest.raises(StoreError, match=r"multiple of the 15 rows.*first position skipped"):
        cache_model(
            fn,
            batches(tokens(), 4),
            writer(tmp_path / "t", shard_rows=64),
            skip_first_position=True,
            log=lambda s: None,
        )


def test_store_without_tokens(fn, tmp_path):
    toks = tokens(4)
    with writer(tmp_path / "s", shard_rows=64, with_tokens=False) as w:
        cache_model(fn, [toks], w, log=lambda s: None)
    store = Store(tmp_path / "s")
    np.testing.assert_array_equal(store.read_rows(0, 64), np.asarray(fn(toks)).reshape(-1, D_MLP))
