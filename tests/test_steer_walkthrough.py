"""scripts/steer_test_code.py end to end at a tiny size: an LM on the stdlib with its tests under path
headers, the contrast texts it cuts, the direction, and the sweep's files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import ROOT

from sae.steer.directions import Direction


@pytest.mark.slow
def test_steer_walkthrough_runs_end_to_end(tmp_path):
    out = tmp_path / "trait"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,  # the tests' cache (conftest.py)
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    args = [f"out={out}", "lm_steps=25", "n_examples=16", "n_prompts=8", "alphas=[-4,0,4]", "max_new_tokens=8"]
    proc = subprocess.run(
        [sys.executable, str(Path(ROOT) / "scripts" / "steer_test_code.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    positives = [json.loads(line) for line in (out / "texts" / "positive.jsonl").read_text().splitlines()]
    assert len(positives) == 16 and all(p["prompt"].startswith("# Lib/test/") for p in positives)
    negatives = [json.loads(line) for line in (out / "texts" / "negative.jsonl").read_text().splitlines()]
    assert len(negatives) == 16 and not any(p["prompt"].startswith("# Lib/test/") for p in negatives)
    direction = Direction.load(out / "direction")
    assert direction.sites == [f"blocks.0.hook_resid_{s}" for s in ("pre", "mid", "post")]
    report = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [a["alpha"] for a in report["alphas"]] == [-4, 0, 4] and report["monitoring"]["n"] == 8
    assert report["site"] in direction.sites and (out / "sweep" / "sweep.png").stat().st_size > 0
    assert "sae-steer sweep at " in proc.stdout
