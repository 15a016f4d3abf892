"""`sae-cache source=hf` on a tiny random Llama (a BOS model): packing, rows against transformers, several
sites in one pass, resume, loss recovered in sae-train, and each bad input as one line with nothing written."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from hf_oracle import TEXT, save_checkpoint, tiny_llama
from safetensors.numpy import load_file, save_file

import sae.cache as cache_lib
from sae import cli
from sae.cache import cache
from sae.config import CacheConfig, CorpusConfig
from sae.data.hf import HFRowsConfig
from sae.data.store import MANIFEST, Store

N_CTX = 16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = tiny_llama(attn_implementation="eager")
    return save_checkpoint(hf, tmp_path_factory.mktemp("llama")), hf


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for i in range(40):
        (root / f"doc{i}.txt").write_text(f"# document {i}\n" + "".join(TEXT[i % 4 :: 3]))
    return root


def config(model, corpus, out, **source) -> CacheConfig:
    fields = {"sites": ["blocks.0.hook_resid_post"], "n_rows": 150, "n_ctx": N_CTX, "batch_size": 4, **source}
    return CacheConfig(
        source=HFRowsConfig(path=str(model), **fields),
        out=str(out),
        corpus=CorpusConfig(path=str(corpus), pattern="*.txt", val_fraction=0.25),
        dtype="float32",
        shard_rows=30,
    )


def test_bos_packing_and_rows_equal_transformers(llama, corpus, tmp_path):
    """Each sequence is BOS + 15 tokens of the stream; BOS positions are left out unless keep_bos; the rows
    are transformers' hidden states after block 0 at the positions kept."""
    path, hf = llama
    cache(config(path, corpus, tmp_path / "a"))
    store = Store(tmp_path / "a")
    assert store.n_rows == 150 and store.provenance["template"] == {"prefix": [1], "suffix": [], "kept": False}
    ids, positions = store.read_tokens(0, 150)
    np.testing.assert_array_equal(positions, np.tile(np.arange(1, N_CTX), 10))
    tokens = np.concatenate([np.ones((10, 1), int), ids.reshape(10, N_CTX - 1)], axis=1)
    with torch.no_grad():
        hidden = hf(torch.as_tensor(tokens), output_hidden_states=True).hidden_states[1].numpy()
    np.testing.assert_allclose(store.read_rows(0, 150), hidden[:, 1:].reshape(-1, 32), atol=1e-5, rtol=1e-5)
    cache(config(path, corpus, tmp_path / "b", keep_bos=True, n_rows=160))
    kept = Store(tmp_path / "b")
    np.testing.assert_array_equal(kept.read_tokens(0, 160)[1], np.tile(np.arange(N_CTX), 10))
    np.testing.assert_allclose(kept.read_rows(0, 160), hidden.reshape(-1, 32), atol=1e-5, rtol=1e-5)


def test_two_sites_resume_after_a_kill_to_the_uninterrupted_stores(llama, corpus, tmp_path, monkeypatch):
    from test_cache import Interrupted

    path, _ = llama
    sites = ["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_post"]
    cache(config(path, corpus, tmp_path / "whole", sites=sites))
    open_source = cache_lib.open_source
    monkeypatch.setattr(cache_lib, "open_source", lambda cfg: Interrupted(open_source(cfg), limit=1))
    with pytest.raises(RuntimeError, match="killed"):
        cache(config(path, corpus, tmp_path / "cut", sites=sites))
    monkeypatch.setattr(cache_lib, "open_source", open_source)
    cache(config(path, corpus, tmp_path / "cut", sites=sites))
    for site in sites:
        a, b = Store(tmp_path / "whole" / site), Store(tmp_path / "cut" / site)
        assert a.d_in == (48 if "mlp" in site else 32) and a.provenance["hook_name"] == site
        np.testing.assert_array_equal(a.read_rows(0, 150), b.read_rows(0, 150))
        np.testing.assert_array_equal(a.read_tokens(0, 150)[0], b.read_tokens(0, 150)[0])


def test_sae_train_reports_loss_recovered_for_a_llama_store(llama, corpus, tmp_path):
    from conftest import small_config

    from sae.config import LoggerConfig
    from sae.data.cached import CachedConfig
    from sae.training import train

    path, _ = llama
    cache(config(path, corpus, tmp_path / "store", sites=["blocks.1.hook_resid_mid"], n_rows=600))
    cfg = small_config("topk", total_tokens=2048, k=4)
    cfg.data = CachedConfig(path=str(tmp_path / "store"), eval_tokens=60)
    cfg.trainer = dataclasses.replace(cfg.trainer, batch_size=64, geometric_median_samples=64)
    cfg.logger = LoggerConfig(name="none")
    train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["ce_loss_score"]) and metrics["kl_div"] > 0
    assert metrics["ce_loss_zero_ablation"] > metrics["ce_loss_clean"]
    meta = json.loads((tmp_path / "run" / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == path.name and meta["hook_name"] == "blocks.1.hook_resid_mid"
    assert meta["context_size"] == N_CTX and meta["prepend_bos"] is True


def broken(kind: str, model, corpus, tmp_path) -> tuple[CacheConfig, str]:
    """(sae-cache config, what the one line must say) for one bad input."""
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    args = {"path": copy, "sites": ["blocks.0.hook_resid_post"], "n_ctx": N_CTX, "corpus": corpus}
    if kind == "no_config":
        (copy / "config.json").unlink()
        expected = f"'{copy}' has no config.json"
    elif kind == "model_type":
        hf_config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**hf_config, "model_type": "t5"}))
        expected = "model_type='t5' is not supported; supported: ['bert', 'gemma2', 'gpt2', 'gpt_neox', 'llama'"
    elif kind in ("missing_tensor", "wrong_shape"):
        tensors = load_file(weights)
        name = "model.layers.1.mlp.up_proj.weight"
        if kind == "missing_tensor":
            del tensors[name]
            expected = f"has no tensor '{name}' (expected shape [48, 32])"
        else:
            tensors[name] = tensors[name][:40]
            expected = f"tensor '{name}' has shape [40, 32]; expected [48, 32]"
        save_file(tensors, weights, metadata={"format": "pt"})
    elif kind == "site":
        args["sites"] = ["blocks.2.hook_resid_post"]
        expected = "'blocks.2.hook_resid_post' is not a site of this model; its sites are blocks.<0..1>."
    elif kind == "n_ctx":
        args["n_ctx"] = 64
        expected = "source.n_ctx=64 exceeds the model's 32 positions"
    elif kind == "shards":
        args["model_shards"] = 64
        expected = f"source.model_shards=64 exceeds the {jax.device_count()} devices"
    elif kind == "no_text":
        (tmp_path / "empty.txt").write_text("\n\n")
        args["corpus"] = tmp_path / "empty.txt"
        expected = "empty.txt' holds no text"
    else:
        (copy / "tokenizer.json").unlink()
        expected = f"'{copy}' has no tokenizer.json"
    cfg = config(
        args["path"],
        args["corpus"],
        tmp_path / "out",
        sites=args["sites"],
        n_ctx=args["n_ctx"],
        model_shards=args.get("model_shards", 1),
    )
    return cfg, expected


@pytest.mark.parametrize(
    "kind",
    ["no_config", "model_type", "missing_tensor", "wrong_shape", "site", "n_ctx", "shards", "no_text", "tokenizer"],
)
def test_bad_input_is_one_line_and_writes_nothing(kind, llama, corpus, tmp_path, capsys):
    cfg, expected = broken(kind, llama[0], corpus, tmp_path)
    out = tmp_path / "out"
    code, err = cli.run_job(lambda: cache(cfg)), capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and expected in err, err
    assert not (out / MANIFEST).exists() and not any(out.glob("*.npy"))


def test_load_names_the_supported_families(llama, tmp_path):
    from sae.models import ModelError, load

    copy = tmp_path / "m"
    shutil.copytree(llama[0], copy)
    (copy / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ModelError, match=r"model_type='mamba' is not supported; supported: \['bert', 'gemma2'"):
        load(copy)
    assert dataclasses.is_dataclass(load(llama[0])[0].config)
