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
