"""Checkpoints and resume: an interrupted run (SIGTERM, SIGKILL, a damaged checkpoint) ends bit-identical
to an uninterrupted one; mismatched checkpoints refuse to load; the latest K plus the best are kept."""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILY_TESTS, ROOT, small_config
from safetensors.numpy import load_file

from sae.architectures import FAMILIES
from sae.checkpoint import CHECKPOINTS, UNREADABLE, CheckpointMismatch, Preempted, resume_source
from sae.config import CheckpointConfig, SweepConfig
from sae.data.synthetic import SyntheticBatches
from sae.errors import ConfigError
from sae.training import train

FAMILY_FIELDS = {name: t.small for name, t in FAMILY_TESTS.items()}


def _config(name: str, every: int = 8, **checkpoint):
    cfg = small_config(name, total_tokens=40 * 512, **FAMILY_FIELDS[name])
    cfg.trainer = replace(cfg.trainer, batch_size=512, log_every=5)
    cfg.checkpoint = CheckpointConfig(every=every, **checkpoint)
    return cfg


def _outputs(run: Path) -> tuple[dict, dict, list]:
    """(final weights, final metrics, per-step log without timings) of a finished run."""
    weights = load_file(run / "sae" / "sae_weights.safetensors")
    metrics = json.loads((run / "metrics.json").read_text())
    log = [
        {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    return weights, metrics, log


def _assert_same_run(a: Path, b: Path) -> None:
    wa, ma, la = _outputs(a)
    wb, mb, lb = _outputs(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=key)
    assert ma == mb
    assert la == lb


def _sigterm_at(monkeypatch, step: int) -> None:
    """Send this process SIGTERM while the batch of `step` is being handed to the train step."""
    original = SyntheticBatches.train_batches

    def batches(self, batch_size, n_batches, seed, start_batch=0):
        for i, x in enumerate(original(self, batch_size, n_batches, seed, start_batch), start=start_batch + 1):
            if i == step:
                os.kill(os.getpid(), signal.SIGTERM)
            yield x

    monkeypatch.setattr(SyntheticBatches, "train_batches", batches)


KILLED_WORKER = """
import sys
sys.path.insert(0, sys.argv[3])
from test_checkpoint import _config
from sae.training import train
train(_config(sys.argv[1]), sys.argv[2])
"""


def _sigkill_at_random_step(name: str, run: Path) -> int:
    """Train family `name` in a subprocess and SIGKILL it once it reports a random step; returns that step."""
    at = random.Random().randint(12, 30)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER, name, str(run), os.path.dirname(__file__)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= at:
            proc.kill()
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == -signal.SIGKILL, f"not killed at step {at}: {out[-2000:]}"
    return at


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILY_FIELDS))
def test_killed_or_stopped_runs_resume_bit_identical(name, tmp_path, monkeypatch, capsys):
    """Every family: (1) a run SIGKILLed at a random step resumes from its last checkpoint; (2) SIGTERM at
    step 13 checkpoints step 13 and stops, and a rerun resumes there. Both end with the uninterrupted
    run's weights, metrics and log, exactly."""
    cfg = _config(name)
    train(cfg, tmp_path / "whole")
    at = _sigkill_at_random_step(name, tmp_path / "killed")
    assert not (tmp_path / "killed" / "metrics.json").exists()
    committed = [p.name for p in (tmp_path / "killed" / CHECKPOINTS).iterdir() if p.name.isdigit()]
    capsys.readouterr()
    train(cfg, tmp_path / "killed")
    assert not committed or f"(step {max(map(int, committed))})" in capsys.readouterr().out, (at, committed)
    _assert_same_run(tmp_path / "whole", tmp_path / "killed")
    with monkeypatch.context() as patch:
        _sigterm_at(patch, 13)
        with pytest.raises(Preempted) as stopped:
            train(cfg, tmp_path / "cut")
    assert stopped.value.step == 13
    assert sorted(int(p.name) for p in (tmp_path / "cut" / CHECKPOINTS).iterdir() if p.name.isdigit()) == [8, 13]
    assert not (tmp_path / "cut" / "metrics.json").exists()
    train(cfg, tmp_path / "cut")
    _assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_damaged_and_half_written_checkpoints_are_skipped(tmp_path, monkeypatch):
    """The newest checkpoint damaged and a later one half-written (orbax's tmp folder): the run warns
    naming the damaged one, moves it aside (not deleted), resumes from the one before, and still ends
    bit-identical to an uninterrupted run."""
    cfg = _config("topk", keep=5, best_metric=None)
    train(cfg, tmp_path / "whole")
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        _sigterm_at(patch, 25)
        train(cfg, cut)  # checkpoints 8, 16, 24, 25
    damaged = cut / CHECKPOINTS / "25"
    for path in damaged.rglob("*"):
        if path.is_file() and path.parent.name != "meta":
            path.write_bytes(b"\0" * 7)
    half = cut / CHECKPOINTS / "30.orbax-checkpoint-tmp"
    half.mkdir()
    (half / "state").mkdir()
    with pytest.warns(UserWarning, match=f"checkpoint {damaged} is damaged"):
        train(cfg, cut)
    assert any(p.name.startswith("25-") for p in (cut.parent / "cut" / UNREADABLE).iterdir())
    assert not half.exists()
    _assert_same_run(tmp_path / "whole", cut)


def test_other_architecture_or_width_refuses_to_resume(tmp_path):
    cfg = _config("topk", every=0)
    train(cfg, tmp_path)
    wider = replace(cfg, sae=replace(cfg.sae, d_sae=128))
    with pytest.raises(CheckpointMismatch, match=r"sae.d_sae=96 there but 128 here"):
        train(wider, tmp_path)
    relu = replace(cfg, sae=FAMILIES["relu"].config(d_sae=96))
    with pytest.raises(CheckpointMismatch, match=r"sae.name='topk' there but 'relu' here"):
        train(relu, tmp_path)


def test_keeps_latest_and_best(tmp_path):
    """keep=1 with best_metric=l0 (max): the newest checkpoint stays, and so does the one of highest L0."""
    cfg = _config("relu", every=4, keep=1, best_metric="l0", best_mode="max")
    cfg.trainer = replace(cfg.trainer, log_every=4)
    train(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.isdigit())
    l0 = {line["step"]: line["l0"] for line in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    best = max((s for s in l0 if s % 4 == 0 or s == 40), key=lambda s: l0[s])
    assert steps == sorted({40, best})
    assert best != 40  # L0 falls as the sparsity penalty warms up: the best is an early one


def test_resume_paths(tmp_path):
    (tmp_path / CHECKPOINTS / "8" / "state").mkdir(parents=True)
    assert resume_source(None, tmp_path) == (tmp_path / CHECKPOINTS, None)
    assert resume_source(None, tmp_path / "fresh") is None
    assert resume_source(str(tmp_path), tmp_path / "new") == (tmp_path / CHECKPOINTS, None)
    assert resume_source(str(tmp_path / CHECKPOINTS / "8"), tmp_path / "new") == (tmp_path / CHECKPOINTS, 8)
    with pytest.raises(ConfigError, match="resume="):
        resume_source(str(tmp_path / "nothing"), tmp_path)


# --- the CLI in a subprocess: SIGKILL and SIGTERM ----------------------------------------------------

CLI_ARGS = [
    "data.d_in=24",
    "data.n_features=48",
    "data.mean_active=3",
    "data.eval_tokens=4096",
    "sae.d_sae=512",
    "trainer.batch_size=256",
    "trainer.total_tokens=38400",
    "trainer.log_every=1",
    "trainer.geometric_median_samples=512",
    "checkpoint.every=20",
    "optim.lr=0.003",
]


def _cli(run: Path, family: list[str]) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "scripts", "train_sae.py"), *family, *CLI_ARGS, f"hydra.run.dir={run}"]


def _env() -> dict:
    cache = os.path.join(tempfile.gettempdir(), "sae-jax-test-cache")
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def _committed_checkpoint(run: Path) -> bool:
    """Whether orbax has committed a checkpoint (a step folder without its -tmp suffix) in the run."""
    return any(p.name.isdigit() for p in (run / CHECKPOINTS).glob("*"))


def _interrupt(run: Path, family: list[str], at: int, sig: int, after_a_checkpoint: bool = False) -> tuple[int, str]:
    """Start the CLI and send it `sig` once it reports step `at` (and, with after_a_checkpoint, once a
    checkpoint is committed: saves are asynchronous, and a few fast steps may pass before one lands);
    returns (exit status, rest of its output)."""
    proc = subprocess.Popen(
        _cli(run, family), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT
    )
    last = 0
    for line in proc.stdout:
        if line.startswith("step "):
            last = int(line.split()[1].split("/")[0])
            if last >= at and (not after_a_checkpoint or _committed_checkpoint(run)):
                proc.send_signal(sig)
                break
    rest = proc.communicate(timeout=120)[0]
    assert last >= at, rest
    return proc.returncode, rest


def test_sweep_resumes_bit_identical(tmp_path, monkeypatch):
    """A one-pass sweep (two k) stopped by SIGTERM resumes every instance to its uninterrupted end."""
    cfg = _config("topk")
    cfg.sweep = SweepConfig(key="sae.k", values=[2, 3])
    train(cfg, tmp_path / "whole")
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        _sigterm_at(patch, 13)
        train(cfg, tmp_path / "cut")
    train(cfg, tmp_path / "cut")
    for label in ("k=2", "k=3"):
        _assert_same_run(tmp_path / "whole" / label, tmp_path / "cut" / label)


def test_resume_from_another_run_directory(tmp_path, monkeypatch):
    """resume=<run dir> continues that run's checkpoint (and its log) in a new directory, leaving the old one
    as it was."""
    cfg = _config("relu")
    train(cfg, tmp_path / "whole")
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        _sigterm_at(patch, 13)
        train(cfg, tmp_path / "first")
    before = sorted(p.name for p in (tmp_path / "first" / CHECKPOINTS).iterdir())
    train(replace(cfg, resume=str(tmp_path / "first")), tmp_path / "second")
    assert sorted(p.name for p in (tmp_path / "first" / CHECKPOINTS).iterdir()) == before
    _assert_same_run(tmp_path / "whole", tmp_path / "second")
