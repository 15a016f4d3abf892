"""`toy-train` end to end: the interface's files, a Hydra multirun, bad values, and instances sharded
over several devices training the same as on one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from toy_models.train import Task, train

SCRIPT = str(Path(ROOT) / "scripts" / "train_toy.py")


def run_cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """`toy-train -m toy=intro seed=0,1` at a small budget."""
    out = tmp_path_factory.mktemp("multirun")
    proc = run_cli(
        "-m",
        "toy=intro",
        "seed=0,1",
        "train.steps=2000",
        "train.n_seeds=2",
        "data.feature_probability=[1.0,0.3,0.03]",
        f"hydra.sweep.dir={out}",
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_interface_files(multirun):
    run = multirun / "0"
    results = np.load(run / "results.npz")
    assert results["W"].shape == (3, 2, 5)  # [n_settings, n_hidden, n_features]
    assert results["b"].shape == (3, 5) and results["loss"].shape == (3,)
    np.testing.assert_allclose(results["feature_probability"], [1.0, 0.3, 0.03])
    np.testing.assert_allclose(results["importance"], np.tile(0.9 ** np.arange(5), (3, 1)), rtol=1e-12)
    # the kept seed is the best of each setting
    np.testing.assert_array_equal(results["loss"], results["loss_per_seed"].min(axis=0))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["n_represented"] for s in metrics["settings"]] == sorted(s["n_represented"] for s in metrics["settings"])
    assert metrics["settings"][0]["geometry"]["label"] == "orthogonal pair"
    assert metrics["settings"][2]["n_represented"] >= 4
    for name in ("loss.png", "wtw.png", "arrows.png", "dimensionality.png"):
        assert (run / name).stat().st_size > 5000, name
    assert sorted(metrics["figures"]) == ["arrows.png", "dimensionality.png", "loss.png", "wtw.png"]


def test_multirun_seeds_differ(multirun):
    first, second = (np.load(multirun / d / "results.npz")["W"] for d in ("0", "1"))
    assert not np.allclose(first, second)


CASES = {
    "zero_features": (["model.n_features=0"], "model.n_features=0"),
    "probability_above_one": (["data.feature_probability=[0.5,1.5]"], "data.feature_probability=[0.5, 1.5]"),
    "probability_zero": (["data.feature_probability=[0.0]"], "every value in (0, 1]"),
    "importance_length": (["model.n_features=5", "data.importance=[1.0,0.5]"], "5 values"),
    "unknown_kind": (["model.kind=mlp"], "model.kind='mlp'"),
    "unknown_key": (["model.width=3"], "width"),
    "unknown_experiment": (["toy=nope"], "nope"),
}


def test_bad_values_fail_at_start_up(tmp_path):
    procs = {}
    for name, (overrides, _) in CASES.items():
        procs[name] = subprocess.Popen(
            [sys.executable, SCRIPT, *overrides, f"hydra.run.dir={tmp_path / name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, name
        assert CASES[name][1] in err, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert not (tmp_path / name / "results.npz").exists(), name


SHARDED = """
import sys, numpy as np
from toy_models.train import Task, train
r = train(Task("relu", 5, 2, 128), np.array([1.0, 0.3, 0.1]), np.ones((3, 5)), seed=1, steps=300, steps_per_call=150)
np.savez(sys.argv[1], eval_loss=r.eval_loss, **r.params)
"""


def test_instances_sharded_over_devices_train_as_on_one(tmp_path):
    """3 instances over 2 devices (one padding instance) end where a single device ends."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path / "sharded.npz")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = np.load(tmp_path / "sharded.npz")
    single = train(
        Task("relu", 5, 2, 128), np.array([1.0, 0.3, 0.1]), np.ones((3, 5)), seed=1, steps=300, steps_per_call=150
    )
    np.testing.assert_allclose(sharded["W"], single.params["W"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sharded["b"], single.params["b"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sharded["eval_loss"], single.eval_loss, rtol=1e-4)
