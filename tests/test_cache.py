"""`sae-cache`: importing arrays, generating synthetic and toy stores, resuming, and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import save_file

import sae.cache as cache_lib
from sae.cache import GROUND_TRUTH, cache, open_source
from sae.config import CacheConfig
from sae.data import DataError, synthetic, toy
from sae.data.arrays import ArrayRowsConfig
from sae.data.store import MANIFEST, PROGRESS, Store, StoreError
from sae.data.synthetic import SyntheticRowsConfig
from sae.data.toy import ToyRowsConfig
from sae.errors import ConfigError
from toy_models.config import ToyConfig, ToyDataConfig, ToyModelConfig, to_dict

SCRIPT = str(Path(ROOT) / "scripts" / "cache_activations.py")
NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def acts(n: int, d_in: int = 6, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d_in)).astype(dtype)


def arrays_cfg(path, out, tensor=None, **kwargs) -> CacheConfig:
    kwargs = {"shard_rows": 100, "chunk_rows": 30, **kwargs}
    return CacheConfig(source=ArrayRowsConfig(path=str(path), tensor=tensor), out=str(out), **kwargs)


def synthetic_cfg(out, n_rows=2000, **kwargs) -> CacheConfig:
    source = SyntheticRowsConfig(d_in=8, n_features=24, mean_active=3.0, n_rows=n_rows)
    return CacheConfig(source=source, out=str(out), **{"shard_rows": 300, "chunk_rows": 100, **kwargs})


def same_bits(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))


def checksums(path) -> list[str]:
    return [s["checksum"] for s in json.loads((Path(path) / MANIFEST).read_text())["shards"]]


@pytest.fixture
def small_blocks(monkeypatch):
    """Generated sources in blocks of 256 rows, so a few thousand rows span many blocks."""
    for module in (synthetic, toy):
        monkeypatch.setattr(module, "block_rows", lambda width: 256)


# --- arrays ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("input_dtype", [np.float32, np.float16])
def test_npy_import_is_bit_identical(tmp_path, input_dtype, store_dtype):
    data = acts(1000, dtype=input_dtype)
    np.save(tmp_path / "acts.npy", data)
    manifest = cache(arrays_cfg(tmp_path / "acts.npy", tmp_path / "store", dtype=store_dtype))
    store = Store(tmp_path / "store")
    assert manifest["n_rows"] == store.n_rows == 1000 and [s.rows for s in store.shards] == [100] * 10
    same_bits(store.read_rows(0, 1000), data.astype(NP_DTYPES[store_dtype]))
    assert manifest["provenance"]["source"] == "arrays" and manifest["provenance"]["seed"] == 0
    assert manifest["provenance"]["config"]["path"] == str(tmp_path / "acts.npy")
    assert not (tmp_path / "store" / GROUND_TRUTH).exists()


def test_safetensors_import(tmp_path):
    one, two = acts(500, seed=1), acts(300, d_in=4, seed=2, dtype=np.float16)
    save_file({"acts": one}, str(tmp_path / "one.safetensors"))
    save_file({"resid": one, "mlp": two}, str(tmp_path / "two.safetensors"))
    cache(arrays_cfg(tmp_path / "one.safetensors", tmp_path / "a", dtype="float32"))
    same_bits(Store(tmp_path / "a").read_rows(0, 500), one)
    manifest = cache(arrays_cfg(tmp_path / "two.safetensors", tmp_path / "b", tensor="mlp"))
    same_bits(Store(tmp_path / "b").read_rows(0, 300), two)
    assert manifest["provenance"]["config"]["tensor"] == "mlp"
    with pytest.raises(DataError, match=r"holds 2 tensors \['mlp', 'resid'\]; pick one with source.tensor"):
        cache(arrays_cfg(tmp_path / "two.safetensors", tmp_path / "c"))
    with pytest.raises(DataError, match=r"source.tensor='attn' is not in .* it holds \['mlp', 'resid'\]"):
        cache(arrays_cfg(tmp_path / "two.safetensors", tmp_path / "c", tensor="attn"))
    save_file({"x": np.zeros((2, 3, 4), np.float32)}, str(tmp_path / "cube.safetensors"))
    with pytest.raises(DataError, match=r"tensor 'x' has shape \(2, 3, 4\), expected 2-D"):
        cache(arrays_cfg(tmp_path / "cube.safetensors", tmp_path / "c"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable .safetensors file"):
        cache(arrays_cfg(tmp_path / "junk.safetensors", tmp_path / "c"))


def test_npy_directory_and_glob_are_concatenated_in_sorted_order(tmp_path):
    parts = {
        "acts_2.npy": acts(70, seed=2),
        "acts_0.npy": acts(130, seed=0, dtype=np.float16),
        "acts_1.npy": acts(45, seed=1),
    }
    (tmp_path / "dir").mkdir()
    for name, data in parts.items():
        np.save(tmp_path / "dir" / name, data)
    expected = np.concatenate([parts[name] for name in sorted(parts)]).astype(np.float32)
    manifest = cache(arrays_cfg(tmp_path / "dir", tmp_path / "s1", dtype="float32"))
    same_bits(Store(tmp_path / "s1").read_rows(0, 245), expected)
    assert [f["rows"] for f in manifest["provenance"]["files"]] == [130, 45, 70]
    cache(arrays_cfg(f"{tmp_path}/dir/acts_*.npy", tmp_path / "s2", dtype="float32"))
    assert checksums(tmp_path / "s2") == checksums(tmp_path / "s1")

    np.save(tmp_path / "dir" / "acts_3.npy", acts(10, d_in=5))
    with pytest.raises(DataError, match=r"acts_3.npy' has d_in=5, the earlier files 6"):
        cache(arrays_cfg(tmp_path / "dir", tmp_path / "s3"))
    with pytest.raises(DataError, match="no file matches"):
        cache(arrays_cfg(f"{tmp_path}/nothing_*.npy", tmp_path / "s3"))
    with pytest.raises(DataError, match="source.tensor='x' is only for a .safetensors"):
        cache(arrays_cfg(tmp_path / "dir", tmp_path / "s3", tensor="x"))
    with pytest.raises(DataError, match=r"source.path='.*missing.npy': no such file"):
        cache(arrays_cfg(tmp_path / "missing.npy", tmp_path / "s3"))


# --- synthetic and toy -------------------------------------------------------------------------------


def test_synthetic_store_is_the_seeded_generators_stream(tmp_path, small_blocks):
    cfg = synthetic_cfg(tmp_path / "a", dtype="float32")
    manifest = cache(cfg)
    cache(synthetic_cfg(tmp_path / "b", dtype="float32"))
    assert checksums(tmp_path / "a") == checksums(tmp_path / "b")
    source = open_source(cfg)
    expected = np.concatenate([c.rows for c in source.chunks(0)])
    assert expected.shape == (2000, 8)
    same_bits(Store(tmp_path / "a").read_rows(0, 2000), expected)
    # the stream from any row on is the tail of the whole stream (resuming need not start on a block)
    same_bits(np.concatenate([c.rows for c in source.chunks(700)]), expected[700:])
    np.testing.assert_array_equal(np.load(tmp_path / "a" / GROUND_TRUTH), source.ground_truth)
    assert source.ground_truth.shape == (24, 8)
    prov = manifest["provenance"]
    assert prov["source"] == "synthetic" and prov["ground_truth"] == GROUND_TRUTH and prov["seed"] == 0
    assert prov["config"]["n_features"] == 24 and prov["config"]["n_rows"] == 2000
    cache(synthetic_cfg(tmp_path / "c", dtype="float32", seed=1))
    assert checksums(tmp_path / "c") != checksums(tmp_path / "a")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy-train output directory with a hand-built pentagon ReLU model (as in test_toy_sae.py)."""
    run = tmp_path_factory.mktemp("toy_run")
    pentagon = np.stack([np.cos(2 * np.pi * np.arange(5) / 5), np.sin(2 * np.pi * np.arange(5) / 5)])
    np.savez(
        run / "results.npz",
        W=pentagon[None],
        b=np.zeros((1, 5)),
        loss=np.zeros(1),
        feature_probability=np.array([0.05]),
        importance=np.ones((1, 5)),
    )
    cfg = ToyConfig(
        model=ToyModelConfig(kind="relu", n_features=5, n_hidden=2), data=ToyDataConfig(feature_probability=[0.05])
    )
    (run / "metrics.json").write_text(json.dumps({"config": to_dict(cfg)}))
    return run


def test_toy_store_holds_the_models_hidden_activations(tmp_path, toy_run, small_blocks):
    cfg = CacheConfig(
        source=ToyRowsConfig(run=str(toy_run), setting=0, n_rows=1500),
        out=str(tmp_path / "s"),
        dtype="float32",
        shard_rows=400,
        chunk_rows=128,
    )
    manifest = cache(cfg)
    source = open_source(cfg)
    expected = np.concatenate([np.asarray(source.toy.block(i, 256, 0)) for i in range(6)])[:1500]
    same_bits(Store(tmp_path / "s").read_rows(0, 1500), expected)
    assert manifest["d_in"] == 2 and manifest["provenance"]["config"]["setting"] == 0
    np.testing.assert_allclose(np.load(tmp_path / "s" / GROUND_TRUTH), source.ground_truth)
    assert np.load(tmp_path / "s" / GROUND_TRUTH).shape == (5, 2)
    bad = CacheConfig(source=ToyRowsConfig(run=str(toy_run), setting=3, n_rows=10), out=str(tmp_path / "t"))
    with pytest.raises(DataError, match=r"source.setting=3: pick one of 0..0"):
        cache(bad)


# --- resuming --------------------------------------------------------------------------------------


class Interrupted:
    """A source that fails once it has given `limit` rows or more, like a killed run."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit = inner, limit

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def chunks(self, start=0):
        given = 0
        for chunk in self.inner.chunks(start):
            if given >= self.limit:
                raise RuntimeError("killed")
            given += len(chunk.rows)
            yield chunk


@pytest.mark.parametrize("kind", ["synthetic", "arrays"])
def test_an_interrupted_run_resumes_to_the_same_store(tmp_path, monkeypatch, capsys, small_blocks, kind):
    if kind == "arrays":
        np.save(tmp_path / "acts.npy", acts(2000))

        def make(out):
            return arrays_cfg(tmp_path / "acts.npy", out, shard_rows=300, chunk_rows=100)
    else:
        make = synthetic_cfg
    cache(make(tmp_path / "whole"))
    monkeypatch.setattr(cache_lib, "open_source", lambda cfg: Interrupted(open_source(cfg), limit=700))
    with pytest.raises(RuntimeError, match="killed"):
        cache(make(tmp_path / "resumed"))
    assert (tmp_path / "resumed" / PROGRESS).exists() and not (tmp_path / "resumed" / MANIFEST).exists()
    monkeypatch.setattr(cache_lib, "open_source", open_source)
    capsys.readouterr()
    cache(make(tmp_path / "resumed"))
    assert "after its 600 stored rows" in capsys.readouterr().out  # two complete shards of 300 (mid-block)
    assert checksums(tmp_path / "resumed") == checksums(tmp_path / "whole")
    with pytest.raises(StoreError, match="already holds a complete store"):
        cache(make(tmp_path / "resumed"))


def test_resuming_with_other_settings_is_refused(tmp_path, monkeypatch, small_blocks):
    monkeypatch.setattr(cache_lib, "open_source", lambda cfg: Interrupted(open_source(cfg), limit=700))
    with pytest.raises(RuntimeError):
        cache(synthetic_cfg(tmp_path / "s"))
    monkeypatch.setattr(cache_lib, "open_source", open_source)
    with pytest.raises(StoreError, match="interrupted cache run with other settings"):
        cache(synthetic_cfg(tmp_path / "s", seed=3))


# --- config checks and the command line ---------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("dtype", "int8", "dtype='int8' is not one of"),
        ("shard_rows", 0, "shard_rows=0 must be > 0"),
        ("chunk_rows", -1, "chunk_rows=-1 must be > 0"),
        ("source.n_rows", 0, "source.n_rows=0 must be > 0"),
        ("source.mean_active", 100.0, r"source.mean_active=100.0 must be in \(0, source.n_features=24\]"),
        ("source.name", "arrays", "source.name='arrays' does not match its schema"),
    ],
)
def test_check_cache_names_the_field(tmp_path, field, value, message):
    cfg = synthetic_cfg(tmp_path / "s")
    setattr(cfg.source if field.startswith("source.") else cfg, field.removeprefix("source."), value)
    with pytest.raises(ConfigError, match=message):
        cache_lib.check(cfg)


@pytest.mark.slow
def test_command_line(tmp_path):
    """The interface commands on tiny sizes, and bad inputs (one line, exit 2 or Hydra's 1), run concurrently."""
    np.save(tmp_path / "acts.npy", acts(500))
    save_file({"a": acts(10), "b": acts(10)}, str(tmp_path / "two.safetensors"))
    cache(arrays_cfg(tmp_path / "acts.npy", tmp_path / "done"))
    ok = {
        "arrays": ["source=arrays", "source.path=acts.npy", "out=arrays_store"],
        "synthetic": [
            "source=synthetic",
            "source.n_features=32",
            "source.d_in=8",
            "source.n_rows=3000",
            "out=synthetic_store",
        ],
    }
    bad = {  # overrides -> text the error must contain
        "missing_npy": (["source=arrays", "source.path=missing.npy", "out=x"], "missing.npy': no such file"),
        "unknown_source": (["source=nope", "out=x"], "source=nope is not one of arrays, hf, synthetic, toy"),
        "two_tensors": (["source=arrays", "source.path=two.safetensors", "out=x"], "pick one with source.tensor"),
        "int8": (["dtype=int8", "out=x"], "dtype='int8' is not one of"),
        "no_rows": (["source.n_rows=0", "out=x"], "source.n_rows=0 must be > 0"),
        "complete_store": (["source=arrays", "source.path=acts.npy", "out=done"], "already holds a complete store"),
        "no_out": (["source=synthetic"], "out is required"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
        for name, args in [*ok.items(), *((name, args) for name, (args, _) in bad.items())]
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if name in ok:
            assert proc.returncode == 0, (name, err[-2000:])
            assert (tmp_path / f"{name}_store" / MANIFEST).is_file(), name
            assert "cache: wrote" in out
        else:
            assert proc.returncode != 0, name
            assert bad[name][1] in err, (name, err[-2000:])
            assert "Traceback" not in err, (name, err[-2000:])
            assert len(err.strip().splitlines()) == 1, (name, err)
    same_bits(Store(tmp_path / "arrays_store").read_rows(0, 500), acts(500).astype(np.float16))
    assert np.load(tmp_path / "synthetic_store" / GROUND_TRUTH).shape == (32, 8)
    assert not (tmp_path / "x").exists()
