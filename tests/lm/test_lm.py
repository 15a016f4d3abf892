"""The language-model workflow: transformer sites and splicing, corpus and tokenizer, lm-train, sae-cache
source=lm and loss recovered; each checked against a NumPy reference or a second code path."""

import dataclasses
import errno
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

import sae.lm.train as lm_train
from sae.checkpoint import Preempted
from sae.cli import run_job
from sae.config import CacheConfig
from sae.data import DataError
from sae.data.lm import LMRowsConfig
from sae.data.model_source import capture_site
from sae.data.store import Store
from sae.lm.config import SITES, CorpusConfig, LMModelConfig, LMTrainConfig, LMTrainerConfig
from sae.lm.model import build, forward, resolve_site, site_names, token_losses
from sae.lm.splice import lm_eval_data, loss_recovered, store_loss_recovered
from sae.lm.text import (
    PRETOKEN,
    BPETokenizer,
    ByteTokenizer,
    CorpusError,
    find_corpus,
    is_validation,
    make_tokenizer,
    random_windows,
    tiled_windows,
)
from sae.lm.train import load_lm, train_lm
from sae.tracking import LoggerConfig

TINY = LMModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, n_ctx=16)
VOCAB = 257


@pytest.fixture(scope="module")
def model():
    return build(TINY, VOCAB, seed=1)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, (3, TINY.n_ctx)).astype(np.int32)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """40 small Python-like files in nested folders, plus files the default pattern / exclusion skip."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = [
        "def",
        "class",
        "return",
        "self",
        "import",
        "for",
        "in",
        "if",
        "else",
        "x",
        "y",
        "(",
        ")",
        ":",
        "=",
        "'héllo'",
        "\n",
        "    ",
    ]
    for i in range(40):
        path = root / f"pkg{i % 4}" / f"mod_{i}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(" ".join(rng.choice(words, 400)))
    (root / "notes.txt").write_text("not python")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("excluded")
    return root


def corpus_cfg(path, tokenizer: str = "bytes") -> CorpusConfig:
    return CorpusConfig(path=str(path), val_fraction=0.25, tokenizer=tokenizer)


# --- model: a NumPy reference forward --------------------------------------------------------------


def _np(v) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def _layer_norm(x, ln):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + ln.epsilon) * _np(ln.scale) + _np(ln.bias)


def reference_forward(model, toks, zero_mlp_post_layer: int | None = None) -> tuple[np.ndarray, dict]:
    """Logits and all sites, in float64 NumPy from the parameters, optionally with one layer's mlp_post zeroed."""
    x = _np(model.embed.embedding)[toks] + _np(model.pos_embed)[: toks.shape[1]]
    sites = {}
    s, h = toks.shape[1], TINY.n_heads
    for layer, block in enumerate(model.blocks):
        sites[f"blocks/{layer}/resid_pre"] = x
        qkv = _layer_norm(x, block.ln1) @ _np(block.attn.qkv.kernel) + _np(block.attn.qkv.bias)
        q, k, v = np.split(qkv.reshape(len(toks), s, 3 * h, -1), 3, axis=2)
        scores = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        z = np.einsum("bhqk,bkhe->bqhe", p, v).reshape(len(toks), s, -1)
        attn_out = z @ _np(block.attn.out.kernel) + _np(block.attn.out.bias)
        x = x + attn_out
        pre = _layer_norm(x, block.ln2) @ _np(block.w_in.kernel) + _np(block.w_in.bias)
        post = np.maximum(pre, 0) * (0.0 if layer == zero_mlp_post_layer else 1.0)
        mlp_out = post @ _np(block.w_out.kernel) + _np(block.w_out.bias)
        sites.update(
            {
                f"blocks/{layer}/attn_out": attn_out,
                f"blocks/{layer}/resid_mid": x,
                f"blocks/{layer}/mlp_pre": pre,
                f"blocks/{layer}/mlp_post": post,
                f"blocks/{layer}/mlp_out": mlp_out,
            }
        )
        x = x + mlp_out
        sites[f"blocks/{layer}/resid_post"] = x
    logits = _layer_norm(x, model.ln_f) @ _np(model.unembed.kernel) + _np(model.unembed.bias)
    return logits, sites


def reference_loss(logits, toks) -> float:
    logits = logits[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float((logz - np.take_along_axis(logits, toks[:, 1:, None], -1)[..., 0]).mean())


def test_forward_and_every_site_match_numpy_reference(model, tokens):
    logits, sites = reference_forward(model, tokens)
    np.testing.assert_allclose(np.asarray(forward(model)(tokens)), logits, rtol=1e-4, atol=1e-5)
    for site in site_names(TINY.n_layers):
        np.testing.assert_allclose(
            np.asarray(capture_site(model, site)(tokens)), sites[site], rtol=1e-4, atol=1e-5, err_msg=site
        )
    loss = float(token_losses(forward(model)(tokens), jnp.asarray(tokens)).mean())
    assert loss == pytest.approx(reference_loss(logits, tokens), rel=1e-5)


def test_identity_splice_gives_exactly_the_clean_loss(model, tokens):
    clean = loss_recovered(model, "blocks/1/mlp_post", lambda x: x, [tokens])
    assert clean["ce_loss_sae"] == clean["ce_loss_clean"]
    assert clean["kl_div"] == 0.0
    assert clean["ce_loss_score"] == 1.0
    logits, _ = reference_forward(model, tokens)
    assert clean["ce_loss_clean"] == pytest.approx(reference_loss(logits, tokens), rel=1e-5)
    assert clean["n_tokens"] == tokens.shape[0] * (tokens.shape[1] - 1)


@pytest.mark.parametrize("layer", [0, 1])
def test_zero_ablation_matches_reference_forward_with_zeros(model, tokens, layer):
    out = loss_recovered(model, f"blocks/{layer}/mlp_post", jnp.zeros_like, [tokens[:2], tokens[2:]])
    zero_logits, _ = reference_forward(model, tokens, zero_mlp_post_layer=layer)
    assert out["ce_loss_zero_ablation"] == pytest.approx(reference_loss(zero_logits, tokens), rel=1e-5)
    assert out["ce_loss_sae"] == pytest.approx(out["ce_loss_zero_ablation"], rel=1e-6)
    assert out["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert out["kl_div"] == pytest.approx(out["kl_div_zero_ablation"], rel=1e-5)


def test_kl_and_score_match_a_second_path(model, tokens):
    """A perturbed reconstruction: CE losses and KL from the spliced forward's logits in NumPy."""

    def reconstruct(x):
        return 0.5 * x + 0.1

    out = loss_recovered(model, "blocks/0/mlp_post", reconstruct, [tokens])
    clean = np.asarray(forward(model)(tokens), np.float64)[:, :-1]
    spliced = np.asarray(forward(model, {"blocks/0/mlp_post": reconstruct})(tokens), np.float64)[:, :-1]
    zero_logits, _ = reference_forward(model, tokens, zero_mlp_post_layer=0)

    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    lp, lq = log_softmax(clean), log_softmax(spliced)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    l_clean = reference_loss(np.pad(clean, ((0, 0), (0, 1), (0, 0))), tokens)  # pad: the last position is unused
    l_sae = reference_loss(np.pad(spliced, ((0, 0), (0, 1), (0, 0))), tokens)
    l_zero = reference_loss(zero_logits, tokens)
    assert out["kl_div"] == pytest.approx(kl, rel=1e-4)
    assert out["ce_loss_sae"] == pytest.approx(l_sae, rel=1e-5)
    assert out["ce_loss_score"] == pytest.approx((l_zero - l_sae) / (l_zero - l_clean), rel=1e-3)


def test_splice_changes_only_the_chosen_site_and_what_follows(model, tokens):
    graphdef, state = nnx.split(model)

    @jax.jit
    def all_sites(state, toks):
        _, inter = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(
            toks, {"blocks/0/mlp_post": lambda a: 2 * a + 1}
        )
        return {"/".join(map(str, p)): v.get_value()[0] for p, v in nnx.to_flat_state(inter)}

    spliced = {k: np.asarray(v) for k, v in all_sites(state, tokens).items()}
    clean = {s: np.asarray(capture_site(model, s)(tokens)) for s in site_names(TINY.n_layers)}
    order = site_names(TINY.n_layers)
    at = order.index("blocks/0/mlp_post")
    assert sorted(spliced) == sorted(order)
    for site in order[:at]:
        np.testing.assert_array_equal(spliced[site], clean[site], err_msg=site)
    np.testing.assert_allclose(spliced[order[at]], 2 * clean[order[at]] + 1, rtol=1e-6)
    for site in order[at + 1 :]:
        assert not np.allclose(spliced[site], clean[site]), site


def test_site_names_and_errors(model, tokens):
    assert resolve_site("blocks/1/mlp_out", 2) == "blocks/1/mlp_out"
    assert resolve_site("mlp_post", 1) == "blocks/0/mlp_post"
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_site("mlp_post", 2)
    with pytest.raises(ValueError, match="'mlp_postt' is not a site"):
        resolve_site("mlp_postt", 1)
    assert len(site_names(2)) == 2 * len(SITES)
    with pytest.raises(ValueError, match="shape"):
        forward(model, {"blocks/0/mlp_post": lambda a: a[..., :3]})(tokens)


# --- text -------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo' + \"\\t\" # ünïcode ✓\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.decode(list(tok.encode("a")) + [tok.eot] + list(tok.encode("b"))) == "a\n<|eot|>\nb"
    assert b"".join(tok.token_bytes(int(i)) for i in ids) == text.encode()


def test_bpe_matches_a_naive_reference(corpus_dir):
    """Trained merges: the first is the most frequent within-chunk pair; encoding equals applying every merge
    in order to each chunk; decoding round-trips; the tokenizer rebuilt from its record encodes the same."""
    texts = find_corpus(corpus_cfg(corpus_dir)).read("train")
    tok = BPETokenizer.train(texts, 300)
    assert tok.vocab_size == 300 and len(tok.merges) == 43
    pairs: dict = {}
    for text in texts:
        for chunk in PRETOKEN.findall(text):
            for pair in itertools.pairwise(chunk):
                pairs[pair] = pairs.get(pair, 0) + 1
    assert pairs[tok.merges[0]] == max(pairs.values())
    text = texts[0].decode() + "\n    return 'ünïcode' ✓ 1234\n"

    def naive(chunk: bytes) -> list[int]:
        ids = list(chunk)
        for rank, (a, b) in enumerate(tok.merges):
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == (a, b):
                    out.append(257 + rank)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    ids = tok.encode(text)
    assert list(ids) == [t for chunk in PRETOKEN.findall(text.encode()) for t in naive(chunk)]
    assert len(ids) < len(text.encode()) and tok.decode(ids) == text
    assert tok.token_lengths()[ids].sum() == len(text.encode())
    again = make_tokenizer(json.loads(json.dumps(tok.to_dict())))
    np.testing.assert_array_equal(again.encode(text), ids)


def test_split_is_by_file_deterministic_and_complete(corpus_dir):
    corpus = find_corpus(corpus_cfg(corpus_dir))
    assert len(corpus.files) == 40 and all(f.endswith(".py") and not f.startswith("tests/") for f in corpus.files)
    assert list(corpus.files) == sorted(corpus.files)
    train, val = corpus.split("train"), corpus.split("val")
    assert set(train).isdisjoint(val) and sorted(train + val) == list(corpus.files)
    assert 0 < len(val) < 40
    assert val == [f for f in corpus.files if is_validation(f, 0.25)]
    assert find_corpus(corpus_cfg(corpus_dir)).split("val") == val  # deterministic
    tok = ByteTokenizer()
    expected = b"".join((corpus_dir / f).read_bytes() + b"\0" for f in val)  # EOT stands where each \0 is
    stream = corpus.tokens("val", tok)
    np.testing.assert_array_equal(np.where(stream == tok.eot, 0, stream), np.frombuffer(expected, np.uint8))
    assert (stream == tok.eot).sum() == len(val)
    with pytest.raises(CorpusError, match="corpus.path"):
        find_corpus(CorpusConfig(path=str(corpus_dir / "missing")))
    with pytest.raises(CorpusError, match="corpus.pattern"):
        find_corpus(CorpusConfig(path=str(corpus_dir), pattern="*.rs"))


def test_windows():
    stream = np.arange(1000, dtype=np.uint16)
    w = random_windows(stream, 16, 8, np.random.default_rng(0))
    assert w.shape == (8, 16) and w.dtype == np.int32
    np.testing.assert_array_equal(np.diff(w, axis=1), 1)
    tiles = tiled_windows(stream, 16, seed=3)
    assert tiles.shape == (62, 16)
    np.testing.assert_array_equal(np.sort(tiles[:, 0]), np.arange(0, 992, 16))
    np.testing.assert_array_equal(tiled_windows(stream, 16, 5, seed=3), tiles[:5])
    with pytest.raises(CorpusError, match="only 62"):
        tiled_windows(stream, 16, 63)


# --- lm-train, sae-cache source=lm, loss recovered from the store -------------------------------------


def tiny_train_config(corpus_dir, steps: int) -> LMTrainConfig:
    trainer = LMTrainerConfig(
        steps=steps,
        batch_size=4,
        steps_per_call=5,
        log_every=5,
        eval_every=10,
        eval_sequences=8,
        checkpoint_every=10,
        samples=1,
        sample_tokens=8,
    )
    return LMTrainConfig(
        model=LMModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=16),
        corpus=corpus_cfg(corpus_dir),
        trainer=trainer,
        logger=LoggerConfig(name="none"),
    )


@pytest.fixture(scope="module")
def lm_run(corpus_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("lm") / "run"
    train_lm(tiny_train_config(corpus_dir, 20), run)
    return run


def test_train_writes_outputs_and_resume_is_exact(lm_run, corpus_dir, tmp_path):
    metrics = json.loads((lm_run / "metrics.json").read_text())
    lines = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train_loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in lines if "val_loss" in r] == [10, 20]
    assert lines[-1]["val_loss"] == metrics["val_loss"] and metrics["steps"] == 20
    assert lines[0]["train_loss"] > lines[-2]["train_loss"]  # it learns
    assert (lm_run / "samples.txt").read_text().startswith("--- sample 0 ---\ndef")
    model, tok, lm_config = load_lm(lm_run)
    assert lm_config["corpus"]["path"] == str(corpus_dir) and lm_config["tokenizer"]["kind"] == "bytes"
    # a second path to the validation loss: the loaded checkpoint on the same windows
    val = find_corpus(corpus_cfg(corpus_dir)).tokens("val", tok)
    windows = tiled_windows(val, 16, 8, seed=0)
    loss = float(token_losses(forward(model)(windows), jnp.asarray(windows)).mean())
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-5)
    # a run stopped after its step-10 checkpoint and resumed ends with the uninterrupted run's parameters
    split = tmp_path / "split"
    shutil.copytree(lm_run, split)
    shutil.rmtree(split / "checkpoints" / "20")
    train_lm(tiny_train_config(corpus_dir, 20), split)

    def records(run):
        return [
            {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert records(split) == records(lm_run)
    resumed, _, _ = load_lm(split)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed)), jax.tree.leaves(nnx.state(model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without its timings."""
    return [
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def _assert_same_lm_run(a: Path, b: Path) -> None:
    """Same parameters (bit for bit), log, metrics (but the time) and samples."""
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}
    assert drop(json.loads((a / "metrics.json").read_text())) == drop(json.loads((b / "metrics.json").read_text()))
    assert _records(a) == _records(b)
    assert (a / "samples.txt").read_text() == (b / "samples.txt").read_text()
    model_a, model_b = load_lm(a)[0], load_lm(b)[0]
    for x, y in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _signal_before(monkeypatch, first: int, signum: int = signal.SIGINT) -> None:
    """Deliver `signum` to this process while the batches of the call starting at step `first` are made."""
    make = lm_train.step_batches

    def batches(tokens, n_ctx, batch_size, seed, start, k):
        if start == first:
            os.kill(os.getpid(), signum)
        return make(tokens, n_ctx, batch_size, seed, start, k)

    monkeypatch.setattr(lm_train, "step_batches", batches)


def test_ctrl_c_saves_the_step_reached_and_the_rerun_ends_as_an_uninterrupted_run(
    corpus_dir, tmp_path, monkeypatch, capsys
):
    """SIGINT during steps 11-15: a checkpoint of step 15 (mid log interval: its losses carried in the
    checkpoint), Preempted; the same call again resumes there and ends bit-identical to an uninterrupted run."""
    cfg = tiny_train_config(corpus_dir, 20)
    cfg.trainer = dataclasses.replace(cfg.trainer, log_every=10)
    train_lm(cfg, tmp_path / "whole")
    lines = [line for line in capsys.readouterr().out.splitlines() if "train loss" in line]
    assert len(lines) == 2 and all(" steps/s | ETA " in line for line in lines), lines
    with monkeypatch.context() as patch, pytest.raises(Preempted) as stop:
        _signal_before(patch, 10)
        train_lm(cfg, tmp_path / "cut")
    assert stop.value.step == 15 and stop.value.signum == signal.SIGINT
    assert str(stop.value).startswith("stopped by SIGINT (Ctrl-C) at step 15; checkpoint saved in ")
    assert (tmp_path / "cut" / "checkpoints" / "15").is_dir() and not (tmp_path / "cut" / "metrics.json").exists()
    train_lm(cfg, tmp_path / "cut")
    assert "at step 15" in capsys.readouterr().out
    _assert_same_lm_run(tmp_path / "whole", tmp_path / "cut")


def test_stop_in_the_last_call_keeps_the_finished_state(corpus_dir, tmp_path, monkeypatch):
    """SIGTERM during the last call: its final checkpoint, exit 143's Preempted; the rerun only finishes
    (samples, metrics.json) with the losses the checkpoint recorded."""
    cfg = tiny_train_config(corpus_dir, 10)
    train_lm(cfg, tmp_path / "whole")
    with monkeypatch.context() as patch, pytest.raises(Preempted) as stop:
        _signal_before(patch, 5, signal.SIGTERM)
        train_lm(cfg, tmp_path / "cut")
    assert (stop.value.step, stop.value.signum) == (10, signal.SIGTERM)
    assert run_job(lambda: train_lm(cfg, tmp_path / "cut")) == 0
    _assert_same_lm_run(tmp_path / "whole", tmp_path / "cut")


def test_read_only_run_dir_is_refused_before_any_work(corpus_dir, tmp_path, monkeypatch, capsys, read_only_outputs):
    def no_work(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(lm_train, "find_corpus", no_work)
    assert run_job(lambda: train_lm(tiny_train_config(corpus_dir, 10), tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert err == f"error: the run directory {tmp_path / 'r'} is not writable: the file system is read-only\n"
    assert not (tmp_path / "r").exists()


def test_full_disk_at_the_end_is_one_line_naming_the_checkpoint(lm_run, corpus_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC writing metrics.json: one line naming the run dir and its intact last checkpoint, no metrics.json."""
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    (run / "metrics.json").unlink()
    write = lm_train.write_atomic

    def full(path, data):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(lm_train, "write_atomic", full)
    assert run_job(lambda: train_lm(tiny_train_config(corpus_dir, 20), run)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {run}: no space left on the device; the last complete checkpoint, ")
    assert f"{run / 'checkpoints' / '20'}, is intact" in err and len(err.splitlines()) == 1, err
    assert not (run / "metrics.json").exists()


def test_lm_cache_store_rows_equal_captured_site(lm_run, tmp_path):
    from sae.cache import cache

    out = tmp_path / "store"
    cfg = CacheConfig(
        source=LMRowsConfig(checkpoint=str(lm_run), site="mlp_post", n_rows=200, batch_size=3),
        out=str(out),
        dtype="float32",
        shard_rows=64,
    )
    cache(cfg)
    store = Store(out)
    assert store.with_tokens and store.n_rows == 208 and store.d_in == 32  # 13 sequences of 16
    prov = store.provenance
    assert prov["model"] == str(lm_run) and prov["site"] == "blocks/0/mlp_post"
    assert prov["tokenizer"]["kind"] == "bytes" and prov["context_length"] == 16 and prov["model_step"] == 20
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == 257 and vocab[ord("a")] == "a" and vocab[0x80] == "\\x80" and vocab[256] == "<|eot|>"
    ids, positions = store.read_tokens(0, store.n_rows)
    np.testing.assert_array_equal(positions, np.tile(np.arange(16), 13))
    model, _, _ = load_lm(lm_run)
    seqs = ids.reshape(13, 16)
    expected = np.asarray(capture_site(model, "mlp_post")(seqs)).reshape(-1, 32)
    np.testing.assert_allclose(store.read_rows(0, store.n_rows), expected, rtol=1e-6, atol=1e-6)
    # evaluation finds the LM, site and validation text from the store
    _, site, batches = lm_eval_data(out, n_sequences=8, batch_size=4)
    assert site == "blocks/0/mlp_post" and [b.shape for b in batches] == [(4, 16), (4, 16)]
    scores = store_loss_recovered(out, lambda x: x, n_sequences=8, batch_size=4)
    assert scores["ce_loss_score"] == 1.0 and scores["kl_div"] == 0.0
    with pytest.raises(DataError, match="source.site='nope'"):
        cache(dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, site="nope"), out=str(tmp_path / "b")))
    with pytest.raises(DataError, match="source.checkpoint="):
        cache(
            dataclasses.replace(
                cfg, source=dataclasses.replace(cfg.source, checkpoint=str(tmp_path)), out=str(tmp_path / "c")
            )
        )


def run_script(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """scripts/<script> with Hydra overrides, sharing the tests' persistent compilation cache (conftest.py)."""
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    return subprocess.run(
        [sys.executable, str(Path(ROOT) / "scripts" / script), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        check=False,
        env=env,
    )


@pytest.mark.slow
def test_lm_train_and_cache_from_the_command_line(corpus_dir, tmp_path):
    run = tmp_path / "run"
    proc = run_script(
        "train_lm.py",
        f"corpus.path={corpus_dir}",
        "corpus.val_fraction=0.25",
        "model.d_model=16",
        "model.n_heads=2",
        "model.d_mlp=32",
        "model.n_ctx=16",
        "corpus.bpe_vocab_size=300",
        "trainer.steps=10",
        "trainer.batch_size=4",
        "trainer.steps_per_call=5",
        "trainer.eval_sequences=4",
        "trainer.samples=0",
        "logger=none",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val loss" in proc.stdout
    for name in ("lm_config.json", "metrics.json", "metrics.jsonl", "checkpoints/10"):
        assert (run / name).exists(), name
    bad = run_script("train_lm.py", "model.n_heads=3", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and "model.d_model=128 must divide by model.n_heads=3" in bad.stderr
    proc = run_script(
        "cache_activations.py",
        "source=lm",
        f"source.checkpoint={run}",
        "source.site=resid_mid",
        "source.n_rows=64",
        f"out={tmp_path / 'store'}",
        "shard_rows=32",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = Store(tmp_path / "store")
    assert store.n_rows == 64 and store.d_in == 16 and store.provenance["site"] == "blocks/0/resid_mid"
    # the default tokenizer is a BPE trained on the training files; the stored ids are its windows of them
    tok = make_tokenizer(store.provenance["tokenizer"])
    assert tok.kind == "bpe" and tok.vocab_size == 300 == len(
        json.loads((tmp_path / "store" / "vocab.json").read_text())
    )
    ids, _ = store.read_tokens(0, 16)
    assert b"".join(tok.token_bytes(int(i)) for i in ids) in b"".join(find_corpus(corpus_cfg(corpus_dir)).read("train"))


CLI_TRAIN = [  # a tiny lm-train of 1000 steps, a line every 2: long enough to be stopped at a random step
    "corpus.tokenizer=bytes",
    "corpus.val_fraction=0.25",
    "model.d_model=16",
    "model.n_heads=2",
    "model.d_mlp=32",
    "model.n_ctx=16",
    "trainer.steps=1000",
    "trainer.batch_size=4",
    "trainer.steps_per_call=2",
    "trainer.log_every=2",
    "trainer.eval_every=100",
    "trainer.checkpoint_every=100",
    "trainer.eval_sequences=4",
    "trainer.samples=1",
    "trainer.sample_tokens=8",
    "logger=none",
]


def _lm_cli(corpus_dir, run: Path) -> list[str]:
    script = str(Path(ROOT) / "scripts" / "train_lm.py")
    return [sys.executable, script, f"corpus.path={corpus_dir}", *CLI_TRAIN, f"hydra.run.dir={run}"]


def _cli_env() -> dict:
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }


@pytest.mark.slow
def test_lm_train_ctrl_c_at_a_random_step_then_rerun_is_bit_identical(corpus_dir, tmp_path):
    """`lm-train` sent SIGINT once it reports a random step: one line, exit 130, a checkpoint of the step
    reached; the same command again resumes there and ends as the uninterrupted run does."""
    env = _cli_env()
    run = lambda name: subprocess.run(
        _lm_cli(corpus_dir, tmp_path / name), capture_output=True, text=True, env=env, cwd=tmp_path, check=False
    )
    whole = run("whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    progress = [line for line in whole.stdout.splitlines() if "train loss" in line]
    assert len(progress) == 500 and all(" steps/s | ETA " in line for line in progress)
    at = random.Random().randint(20, 600)
    proc = subprocess.Popen(
        _lm_cli(corpus_dir, tmp_path / "cut"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= at:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, rest[-2000:]
    assert "Traceback" not in rest, rest[-2000:]
    stopped = int(rest.split("stopped by SIGINT (Ctrl-C) at step ")[1].split(";")[0])
    assert at <= stopped < 1000 and (tmp_path / "cut" / "checkpoints" / str(stopped)).is_dir()
    done = run("cut")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"at step {stopped}" in done.stdout, f"stopped at {stopped}: {done.stdout[:2000]}"
    _assert_same_lm_run(tmp_path / "whole", tmp_path / "cut")
