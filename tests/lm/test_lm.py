"""The in-house LM workflow: corpus and tokenizer, lm-train (which writes a transformers gpt2 directory),
`sae-cache source=hf` on it and loss recovered from the store; each checked against transformers, a
reference or a second code path."""

import dataclasses
import errno
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
import torch
import transformers
from conftest import ROOT
from flax import nnx

import sae.lm.train as lm_train
from sae.checkpoint import Preempted
from sae.cli import run_job
from sae.config import CacheConfig, CorpusConfig
from sae.data import DataError
from sae.data.hf import HFRowsConfig, document_order, store_loss_recovered
from sae.data.store import Store
from sae.lm.config import LMCorpusConfig, LMModelConfig, LMTrainConfig, LMTrainerConfig
from sae.lm.text import (
    CorpusError,
    find_corpus,
    is_validation,
    random_windows,
    tiled_windows,
    token_lengths,
    train_tokenizer,
)
from sae.lm.train import train_lm
from sae.models import load, token_losses
from sae.tracking import LoggerConfig


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


def corpus_cfg(path, tokenizer: str = "bytes") -> LMCorpusConfig:
    return LMCorpusConfig(path=str(path), val_fraction=0.25, tokenizer=tokenizer)


# --- text -------------------------------------------------------------------------------------------


TEXT = "def f(x):\n    return 'héllo' + \"\\t\" # ünïcode ✓\n"


def test_byte_tokenizer_round_trips():
    tok = train_tokenizer([], 257)
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 257 and len(ids) == len(TEXT.encode())
    assert [tok.token_bytes(int(i)) for i in ids] == [bytes([b]) for b in TEXT.encode()]
    assert tok.decode(ids) == TEXT
    assert tok.decode([*tok.encode("a"), tok.eos_id, *tok.encode("b")]) == "a<|endoftext|>b"
    assert token_lengths(tok)[tok.eos_id] == 0 and token_lengths(tok).sum() == 256


def test_bpe_merges_counts_and_round_trip(corpus_dir, tmp_path):
    """The first merge is the most frequent within-chunk byte pair; encoding round-trips and its tokens' bytes
    add up; transformers' fast tokenizer reading the saved tokenizer.json gives the same ids."""
    texts = find_corpus(corpus_cfg(corpus_dir)).texts("train")
    tok = train_tokenizer(texts, 300)
    assert tok.vocab_size == 300
    pairs: dict = {}
    for text in texts:
        for chunk, _ in tok.tokenizer.pre_tokenizer.pre_tokenize_str(text):
            for a, b in zip(chunk, chunk[1:]):
                pairs[a, b] = pairs.get((a, b), 0) + 1
    first = json.loads(tok.tokenizer.to_str())["model"]["merges"][0]
    assert pairs[tuple(first)] == max(pairs.values())
    text = texts[0] + TEXT
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) and tok.decode(ids) == text
    assert token_lengths(tok)[ids].sum() == len(text.encode())
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(text)["input_ids"] == ids.tolist()


def test_split_is_by_file_deterministic_and_complete(corpus_dir):
    corpus = find_corpus(corpus_cfg(corpus_dir))
    assert len(corpus.docs) == 40 and all(f.endswith(".py") and not f.startswith("tests/") for f in corpus.docs)
    assert list(corpus.docs) == sorted(corpus.docs)
    train, val = corpus.split("train"), corpus.split("val")
    assert set(train).isdisjoint(val) and sorted(train + val) == list(corpus.docs)
    assert 0 < len(val) < 40
    assert val == [f for f in corpus.docs if is_validation(f, 0.25)]
    assert find_corpus(corpus_cfg(corpus_dir)).split("val") == val  # deterministic
    tok = train_tokenizer([], 257)
    stream = corpus.tokens("val", tok)
    expected = [t for f in val for t in [*(corpus_dir / f).read_bytes(), None]]  # EOT after each file
    assert [tok.token_bytes(int(t))[0] if t != tok.eos_id else None for t in stream] == expected
    skip = corpus.docs[0].rsplit("/", 1)[-1]
    headed = find_corpus(dataclasses.replace(corpus_cfg(corpus_dir), header="# Lib/{id}", exclude=["tests", skip]))
    assert skip not in [d.rsplit("/", 1)[-1] for d in headed.docs] and len(headed.docs) == 40 - 1
    assert headed.texts("val") == [f"# Lib/{d}\n" + (corpus_dir / d).read_text() for d in headed.split("val")]
    with pytest.raises(CorpusError, match="corpus.path"):
        find_corpus(CorpusConfig(path=str(corpus_dir / "missing")))
    with pytest.raises(CorpusError, match="corpus.pattern"):
        find_corpus(CorpusConfig(path=str(corpus_dir), pattern="*.rs"))


def test_txt_and_jsonl_corpora(tmp_path):
    """A .txt is split into paragraphs, a .jsonl into its lines' "text"; bad lines and empty files name the file."""
    paragraphs = [f"paragraph {i}\nline two" for i in range(30)]
    (tmp_path / "a.txt").write_text("\n\n\n".join(paragraphs) + "\n")
    corpus = find_corpus(CorpusConfig(path=str(tmp_path / "a.txt"), val_fraction=0.3))
    assert corpus.docs == tuple(f"a.txt:{i}" for i in range(30))
    assert sorted(corpus.texts("train") + corpus.texts("val")) == sorted(paragraphs)
    assert corpus.split("val") == [d for d in corpus.docs if is_validation(d, 0.3)]
    lines = [json.dumps({"text": f"doc {i}", "id": i}) for i in range(10)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n")
    corpus = find_corpus(CorpusConfig(path=str(tmp_path / "b.jsonl"), val_fraction=0.3))
    assert len(corpus.docs) == 10 and corpus.docs[5] == "b.jsonl:7"
    assert sorted(corpus.texts("train") + corpus.texts("val")) == sorted(f"doc {i}" for i in range(10))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl line 2 has no \"text\" string field"):
        find_corpus(CorpusConfig(path=str(tmp_path / "bad.jsonl")))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="empty.txt' holds no text"):
        find_corpus(CorpusConfig(path=str(tmp_path / "empty.txt")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="not .txt or .jsonl"):
        find_corpus(CorpusConfig(path=str(tmp_path / "x.csv")))


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


# --- lm-train, sae-cache source=hf on its checkpoint, loss recovered from the store -------------------


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
    lm_config = json.loads((lm_run / "lm_config.json").read_text())
    assert lm_config["corpus"]["path"] == str(corpus_dir) and lm_config["corpus"]["tokenizer"] == "bytes"
    model, tok = load(lm_run / "hf")
    # second paths to the validation loss: the saved checkpoint on the same windows, here and in transformers
    val = find_corpus(corpus_cfg(corpus_dir)).tokens("val", tok)
    windows = tiled_windows(val, 16, 8, seed=0)
    logits = np.asarray(model(windows))
    loss = float(token_losses(jnp.asarray(logits), jnp.asarray(windows)).mean())
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(lm_run / "hf").eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(windows, dtype=torch.long)).logits.numpy()
    assert np.abs(theirs - logits).max() <= 1e-4
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
    resumed, _ = load(split / "hf")
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
    model_a, model_b = load(a / "hf")[0], load(b / "hf")[0]
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


def shuffled_stream(corpus_dir, split: str, tok) -> np.ndarray:
    """The split's documents in the order sae-cache reads them (a seed-0 permutation), each then EOT."""
    texts = find_corpus(corpus_cfg(corpus_dir)).texts(split)
    return np.concatenate([np.append(tok.encode(texts[i]), tok.eos_id) for i in document_order(len(texts), 0)])


def test_hf_cache_of_the_lm_equals_transformers_rows(lm_run, corpus_dir, tmp_path):
    """`sae-cache source=hf` on lm-train's checkpoint: the training documents' token stream, cut into
    n_ctx windows (the LM has no BOS), rows equal to transformers' hooked activations; two sites in one pass
    give two stores in the same row order; the store finds its model, site and held-out text again."""
    from sae.cache import cache

    out = tmp_path / "store"
    cfg = CacheConfig(
        source=HFRowsConfig(path=str(lm_run / "hf"), sites=["blocks.0.mlp.hook_post"], n_rows=200, batch_size=3),
        out=str(out),
        corpus=CorpusConfig(path=str(corpus_dir), val_fraction=0.25),
        dtype="float32",
        shard_rows=64,
    )
    cache(cfg)
    store = Store(out)
    assert store.with_tokens and store.n_rows == 208 and store.d_in == 32  # 13 sequences of 16
    prov = store.provenance
    assert prov["model"] == str(lm_run / "hf") and prov["hook_name"] == "blocks.0.mlp.hook_post"
    assert prov["model_type"] == "gpt2" and prov["context_length"] == 16 and prov["template"]["prefix"] == []
    assert prov["dataset"]["path"] == str(corpus_dir) and prov["dataset"]["split"] == "train"
    model, tok = load(lm_run / "hf")
    vocab = json.loads((out / "vocab.json").read_text())
    assert len(vocab) == 257 and vocab[tok.eos_id] == "<|endoftext|>" and "\\x80" in vocab
    ids, positions = store.read_tokens(0, store.n_rows)
    np.testing.assert_array_equal(positions, np.tile(np.arange(16), 13))
    np.testing.assert_array_equal(ids, shuffled_stream(corpus_dir, "train", tok)[:208])
    hf = transformers.AutoModelForCausalLM.from_pretrained(lm_run / "hf").eval()
    got = []
    hook = hf.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, args: got.append(args[0]))
    with torch.no_grad():
        hf(torch.as_tensor(ids.reshape(13, 16), dtype=torch.long))
    hook.remove()
    expected = got[0].numpy().reshape(-1, 32)
    np.testing.assert_allclose(store.read_rows(0, store.n_rows), expected, rtol=1e-5, atol=1e-5)
    # two sites, one pass: out/<site>/ each, rows in the same order
    pair = dataclasses.replace(cfg, out=str(tmp_path / "pair"))
    pair.source = dataclasses.replace(cfg.source, sites=["blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_post"])
    cache(pair)
    post = Store(tmp_path / "pair" / "blocks.0.mlp.hook_post")
    np.testing.assert_array_equal(post.read_rows(0, 208), store.read_rows(0, 208))
    x = Store(tmp_path / "pair" / "blocks.0.ln2.hook_normalized")
    assert x.d_in == 16 and x.provenance["hook_name"] == "blocks.0.ln2.hook_normalized"
    np.testing.assert_array_equal(x.read_tokens(0, 208)[0], ids)
    # the store finds its model, site and held-out text: identity gives the clean loss, which transformers
    # computes the same on those windows
    scores = store_loss_recovered(out, lambda x: x, n_sequences=8, batch_size=4)
    assert scores["ce_loss_score"] == 1.0 and scores["kl_div"] == 0.0 and scores["n_tokens"] == 8 * 15
    val = shuffled_stream(corpus_dir, "val", tok)[: 8 * 16].reshape(8, 16)
    with torch.no_grad():
        clean = hf(torch.as_tensor(val, dtype=torch.long), labels=torch.as_tensor(val, dtype=torch.long)).loss
    assert scores["ce_loss_clean"] == pytest.approx(float(clean), rel=1e-5)
    with pytest.raises(DataError, match="'blocks.0.nope' is not a site of this model"):
        bad = dataclasses.replace(cfg.source, sites=["blocks.0.nope"])
        cache(dataclasses.replace(cfg, source=bad, out=str(tmp_path / "b")))
    with pytest.raises(DataError, match="has no config.json"):
        bad = dataclasses.replace(cfg.source, path=str(tmp_path))
        cache(dataclasses.replace(cfg, source=bad, out=str(tmp_path / "c")))


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
    for name in ("lm_config.json", "metrics.json", "metrics.jsonl", "checkpoints/10", "hf/config.json"):
        assert (run / name).exists(), name
    bad = run_script("train_lm.py", "model.n_heads=3", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and "model.d_model=128 must divide by model.n_heads=3" in bad.stderr
    proc = run_script(
        "cache_activations.py",
        "source=hf",
        f"source.path={run / 'hf'}",
        "source.sites=[blocks.0.hook_resid_mid]",
        "source.n_rows=64",
        f"corpus.path={corpus_dir}",
        "corpus.val_fraction=0.25",
        f"out={tmp_path / 'store'}",
        "shard_rows=32",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = Store(tmp_path / "store")
    assert store.n_rows == 64 and store.d_in == 16 and store.provenance["hook_name"] == "blocks.0.hook_resid_mid"
    # the default tokenizer is a BPE trained on the training files; the stored ids are its tokens of them
    _, tok = load(run / "hf")
    assert tok.vocab_size == 300 == len(json.loads((tmp_path / "store" / "vocab.json").read_text()))
    ids, _ = store.read_tokens(0, 16)
    assert tok.decode(ids) in "<|endoftext|>".join(find_corpus(corpus_cfg(corpus_dir)).texts("train"))


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
