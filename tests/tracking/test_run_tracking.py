"""A training run tracked with W&B offline: curves, histograms and feature-dictionary artifacts read back from
the run's .wandb file; a resumed run continues the same W&B run."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config
from safetensors.numpy import load_file
from test_checkpoint import _sigterm_at

from sae.checkpoint import Preempted
from sae.config import CheckpointConfig
from sae.inspect import inspect_run
from sae.tracking import LoggerConfig, read_wandb_run
from sae.training import train


def _config():
    cfg = small_config("topk", total_tokens=40 * 512, k=3)
    cfg.trainer = replace(cfg.trainer, batch_size=512, log_every=5)
    cfg.checkpoint = CheckpointConfig(every=20)
    cfg.logger = LoggerConfig(name="wandb", histogram_every=10)
    return cfg


def _runs(run_dir: Path) -> list[dict]:
    return [read_wandb_run(path) for path in sorted(run_dir.rglob("run-*.wandb"))]


def test_wandb_run_holds_curves_histograms_and_dictionaries(offline, tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(_config(), run_dir)
    (run,) = _runs(tmp_path)
    rows = {row["_step"]: row for row in run["history"] if "_step" in row}
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])  # step 10
    row = rows[10]
    assert row["metrics/l0"] == pytest.approx(logged["l0"])
    assert row["metrics/explained_variance"] == pytest.approx(1 - logged["fvu"])
    assert row["losses/mse_loss"] == pytest.approx(logged["mse_loss"])
    assert row["details/current_learning_rate"] == pytest.approx(logged["lr"])
    assert row["sparsity/dead_features"] == round(logged["dead_fraction"] * 96)
    density = row["plots/feature_density_line_chart"]
    assert density["_type"] == "histogram" and sum(density["values"]) == 96  # one entry per latent
    assert sum(row["weights/W_dec_norms"]["values"]) == 96
    assert rows[40]["eval/fvu"] == pytest.approx(metrics["fvu"])

    dictionaries = [a for a in run["artifacts"] if a["type"] == "sae"]
    assert [a["metadata"]["step"] for a in dictionaries] == [20, 40]
    assert "latest" in dictionaries[-1]["aliases"] and any("best" in a["aliases"] for a in dictionaries)
    last = dictionaries[-1]["files"]
    weights = load_file(last["sae_weights.safetensors"])
    np.testing.assert_array_equal(weights["W_dec"], load_file(run_dir / "sae" / "sae_weights.safetensors")["W_dec"])
    table = json.loads(Path(last["feature_stats.table.json"]).read_text())
    columns = table["columns"]
    stats = {name: np.asarray([r[columns.index(name)] for r in table["data"]]) for name in columns}
    assert len(table["data"]) == 96
    truth = np.load(run_dir / "ground_truth.npy")
    unit = lambda w: w / np.linalg.norm(w, axis=-1, keepdims=True)
    cosines = unit(weights["W_dec"]) @ unit(truth).T
    np.testing.assert_allclose(stats["true_cosine"], cosines.max(1), atol=1e-5)
    np.testing.assert_array_equal(stats["true_feature"], cosines.argmax(1))
    assert np.all((stats["density"] >= 0) & (stats["density"] <= 1))
    assert np.mean(stats["density"]) * 96 == pytest.approx(metrics["l0"], rel=1e-5)  # Σ density = L0
    assert np.all(stats["max_activation"] >= stats["mean_activation"])

    # sae-inspect adds its summary plots to the same W&B run
    inspect_run(run_dir, rows=4096)
    first, again = _runs(tmp_path)
    assert again["run_id"] == first["run_id"]
    images = {
        key
        for row in again["history"]
        for key, value in row.items()
        if isinstance(value, dict) and value.get("_type") == "image-file"
    }
    assert {"inspect/density", "inspect/l0", "inspect/recovery"} <= images


def test_resumed_run_continues_its_wandb_run(offline, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        _sigterm_at(patch, 25)
        train(_config(), run_dir)
    train(_config(), run_dir)
    first, second = _runs(tmp_path)
    assert first["run_id"] == second["run_id"]
    assert max(r.get("_step", 0) for r in first["history"]) <= 25
    assert min(r["_step"] for r in second["history"] if "_step" in r) > 25
