"""A trained toy model as an SAE's activation source, and `toy-sae`'s per-setting recovery report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from sae.architectures.topk import TopKConfig
from sae.config import Config, TrainerConfig
from sae.data import DataError, open_batch_source
from sae.data.toy import ToyRunConfig
from sae.toy_sae import train_per_setting
from toy_models.config import ToyConfig, ToyDataConfig, ToyModelConfig, to_dict

PENTAGON = np.stack([np.cos(2 * np.pi * np.arange(5) / 5), np.sin(2 * np.pi * np.arange(5) / 5)])
PAIR = np.array([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.01]])  # features 0, 1; the rest dropped


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A toy-train output directory holding two hand-built ReLU models (no toy training needed)."""
    run = tmp_path_factory.mktemp("toy_run")
    np.savez(
        run / "results.npz",
        W=np.stack([PENTAGON, PAIR]),
        b=np.zeros((2, 5)),
        loss=np.zeros(2),
        feature_probability=np.array([0.05, 0.05]),
        importance=np.ones((2, 5)),
    )
    cfg = ToyConfig(
        model=ToyModelConfig(kind="relu", n_features=5, n_hidden=2),
        data=ToyDataConfig(feature_probability=[0.05, 0.05]),
    )
    (run / "metrics.json").write_text(json.dumps({"config": to_dict(cfg)}))
    return run


def test_source_gives_the_toy_models_hidden_activations(toy_run):
    source = open_batch_source(ToyRunConfig(run=str(toy_run), setting=0), 1024, seed=0)
    assert source.d_in == 2
    np.testing.assert_allclose(source.ground_truth, PENTAGON.T, atol=1e-6)
    h = np.concatenate([np.asarray(b) for b in source.train_batches(8192, 8, seed=0)])
    assert h.shape == (65536, 2)
    # E[h] = W E[x] with E[x_i] = p / 2; a sample fires no feature with probability (1 − p)^5
    np.testing.assert_allclose(h.mean(axis=0), PENTAGON @ np.full(5, 0.025), atol=3e-3)
    np.testing.assert_allclose((np.abs(h).sum(axis=1) == 0).mean(), 0.95**5, atol=0.01)
    # only represented features are ground truth
    pair = open_batch_source(ToyRunConfig(run=str(toy_run), setting=1), 1024, seed=0)
    np.testing.assert_allclose(pair.ground_truth, np.eye(2), atol=1e-6)


def test_bad_toy_runs_are_named(toy_run, tmp_path):
    with pytest.raises(DataError, match="no results.npz"):
        open_batch_source(ToyRunConfig(run=str(tmp_path), setting=0), 1024, seed=0)
    with pytest.raises(DataError, match=r"data.setting=2: pick one of 0..1"):
        open_batch_source(ToyRunConfig(run=str(toy_run), setting=2), 1024, seed=0)


def test_toy_sae_recovers_each_settings_features(toy_run, tmp_path):
    cfg = Config(
        sae=TopKConfig(d_sae=10, k=1),
        data=ToyRunConfig(run=str(toy_run), eval_tokens=8192),
        trainer=TrainerConfig(
            total_tokens=1_000_000, batch_size=1024, log_every=100, dead_tokens=50_000, geometric_median_samples=1024
        ),
    )
    report = train_per_setting(cfg, tmp_path)
    assert [row["setting"] for row in report["settings"]] == [0, 1]
    for row in report["settings"]:
        assert row["mmcs"] > 0.98, row
        assert row["recovered_fraction"] == 1.0, row
    assert json.loads((tmp_path / "toy_sae.json").read_text()) == report
    assert (tmp_path / "setting_1" / "sae" / "cfg.json").is_file()


def test_toy_sae_cli_rejects_a_missing_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(ROOT) / "scripts" / "toy_sae.py"),
            f"data.run={tmp_path / 'nope'}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    assert "no results.npz" in proc.stderr and "Traceback" not in proc.stderr
