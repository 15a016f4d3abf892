"""`toy-train` end to end: the interface's files, a Hydra multirun, bad values, and instances sharded
over several devices training the same as on one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from toy_models.config import ToyConfig, ToyTrainConfig
from toy_models.experiment import Stopped, run
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


# --- progress, Ctrl-C and SIGTERM -----------------------------------------------------------------------


def _stop_at_poll(n: int, signum: int):
    """A stop() that asks for `signum` from its n-th call on (toy_models.experiment.run polls it once per
    compiled call, then once after writing the results)."""
    calls = []

    def stop():
        calls.append(1)
        return signum if len(calls) >= n else None

    return stop


def test_stop_between_calls_keeps_nothing_and_says_so(tmp_path):
    cfg = ToyConfig(train=ToyTrainConfig(steps=400, steps_per_call=100, batch_size=128), figures=False)
    lines = []
    with pytest.raises(Stopped) as stopped:
        run(cfg, tmp_path / "r", log=lines.append, stop=_stop_at_poll(2, signal.SIGINT))
    assert stopped.value.signum == signal.SIGINT
    assert str(stopped.value) == (
        "stopped by SIGINT (Ctrl-C) at step 200 of 400: nothing saved for this run; "
        "run the same command again to start it over"
    )
    assert not (tmp_path / "r" / "results.npz").exists() and not (tmp_path / "r" / "metrics.json").exists()
    progress = [line for line in lines if line.lstrip().startswith("step")]
    assert [line.split()[1] for line in progress] == ["100/400", "200/400"]
    assert all(" steps/s  ETA " in line for line in progress), progress


def test_stop_in_the_last_call_finishes_the_run(tmp_path):
    """A stop asked for once the training is done: the run is analysed and written whole (the entry point
    then reports the stop, saying where the results are)."""
    cfg = ToyConfig(train=ToyTrainConfig(steps=200, steps_per_call=100, batch_size=128), figures=False)
    metrics = run(cfg, tmp_path, log=lambda line: None, stop=_stop_at_poll(2, signal.SIGTERM))
    assert np.load(tmp_path / "results.npz")["W"].shape == (1, 2, 5)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_cli_ctrl_c_is_one_line_and_keeps_the_record(tmp_path):
    """`toy-train` sent SIGINT once it reports progress: exit 130, one line saying nothing was saved, no
    traceback; the run's record (.hydra/, cli.log with the console's lines) is kept."""
    out = tmp_path / "r"
    args = ["toy=intro", "train.steps=2000000", "train.steps_per_call=1000", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    first = proc.stdout.readline()
    while not first.lstrip().startswith("step"):
        first = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert " steps/s  ETA " in first, first
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("SIGINT (Ctrl-C): stopping toy-train at the next safe point"), err
    assert len(lines) == 2 and lines[1].startswith("stopped by SIGINT (Ctrl-C) at step "), err
    assert lines[1].endswith(": nothing saved for this run; run the same command again to start it over"), err
    assert not (out / "results.npz").exists()
    assert (out / ".hydra" / "config.yaml").is_file()
    log = (out / "cli.log").read_text()
    assert first in log and lines[1] in log


def test_plain_runner_reports_a_bad_value_in_one_line(capsys):
    """toy_models.cli's runner without sae: a ToyConfigError is one line and status 2, no record."""
    from toy_models.cli import run_plain
    from toy_models.config import ToyConfigError

    def job(stop=None):
        raise ToyConfigError("model.n_features=0: expected a positive integer")

    assert run_plain(None, job) == 2
    assert capsys.readouterr().err == "error: model.n_features=0: expected a positive integer\n"
    assert run_plain(None, lambda stop=None: None) == 0
