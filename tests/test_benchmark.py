"""scripts/benchmark.py emits one JSON line per architecture with consistent timings (tiny sizes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_benchmark_prints_one_json_line_per_architecture():
    out = subprocess.run(
        [
            sys.executable,
            str(Path(ROOT) / "scripts" / "benchmark.py"),
            "--arch",
            "topk,relu",
            "--d-in",
            "16",
            "--d-sae",
            "64",
            "--batch",
            "128",
            "--k",
            "4",
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["arch"] for line in lines] == ["topk", "relu"]
    for line in lines:
        assert line["step_s"] > 0 and line["matmul_s"] > 0
        assert abs(line["tokens_per_s"] * line["step_s"] - 128) < 1e-6 * 128
        assert abs(line["step_over_matmul"] - line["step_s"] / line["matmul_s"]) < 1e-9


@pytest.mark.slow
def test_benchmark_attribution_prints_one_json_line_per_length():
    out = subprocess.run(
        [
            sys.executable,
            str(Path(ROOT) / "scripts" / "benchmark_attribution.py"),
            "--lengths",
            "16",
            "--features",
            "256",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["prompt_length"] for line in lines] == [16]
    (line,) = lines
    assert line["padded_length"] == 16 and line["n_layers"] == 2 and line["features_per_layer"] == 256
    assert line["attribute_s"] > 0 and line["first_call_s"] > 0 and line["prune_scores_s"] > 0
    assert 0 < line["n_features_active"] <= 2 * 16 * line["k"]
    assert line["n_targets"] == line["n_features_active"] + line["n_logits"] and 1 <= line["n_logits"] <= 10
    assert line["n_nodes"] == line["n_features_active"] + 2 * 16 + 16 + line["n_logits"]
    assert 0 <= line["replacement_score"] <= 1 and 0 <= line["completeness_score"] <= 1
    assert line["median_over_first"] == 1.0
    assert isinstance(line["backend"], str) and len(line["devices"]) >= 1
    assert line["loadavg"] is None or len(line["loadavg"]) == 3


@pytest.mark.slow
def test_benchmark_inspect_reports_the_step_against_the_training_forward():
    args = ["--rows", "2048", "--d-in", "16", "--d-sae", "64", "--k", "4", "--batch", "512", "--no-tokens"]
    script = str(Path(ROOT) / "scripts" / "benchmark_inspect.py")
    out = subprocess.run([sys.executable, script, *args, "--reps", "2"], capture_output=True, text=True, check=True)
    (line,) = [json.loads(text) for text in out.stdout.splitlines() if text.startswith("{")]
    assert line["rows"] == 2048 and line["mean_l0"] == 4.0
    assert line["step_rows_per_s"] > 0 and line["train_forward_rows_per_s"] > 0
    ratio = line["train_forward_rows_per_s"] / line["step_rows_per_s"]
    assert abs(line["step_over_forward"] - ratio) < 0.01 * ratio
