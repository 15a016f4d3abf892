"""The long jobs besides sae-train and sae-cache (lm-train, toy-train, sae-inspect): progress lines with a rate
and an ETA, and a read-only output refused in one line before any work. Their Ctrl-C / SIGTERM tests are
beside each tool's own (tests/lm, tests/toy_models, tests/inspect)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

import sae.progress
from sae.progress import Progress, duration


def _clock(monkeypatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr(sae.progress.time, "perf_counter", lambda: now[0])
    return now


def test_progress_prints_every_twentieth_with_rate_and_eta(monkeypatch, capsys):
    now = _clock(monkeypatch)
    progress = Progress(100, 0, "job", "rows")  # starts at t=0
    for count in range(1, 101):  # one row per second
        now[0] = count
        progress.update(count)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20
    assert lines[0] == "job: 5/100 rows (5%), 1 rows/s, ETA 0:01:35"  # measured from the first update (t=1)
    assert lines[-1] == "job: 100/100 rows (100%), 1 rows/s, ETA 0:00:00"


def test_progress_of_a_resumed_job_counts_only_its_own_work(monkeypatch, capsys):
    now = _clock(monkeypatch)
    progress = Progress(1000, 500, "lm-train", "steps")
    for count in range(600, 1001, 100):  # ten steps per second
        now[0] = (count - 500) / 10
        progress.update(count)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "lm-train: 600/1,000 steps (60%), 10 steps/s, ETA 0:00:40"  # its first line: since the start
    assert lines[1] == "lm-train: 700/1,000 steps (70%), 10 steps/s, ETA 0:00:30"
    assert duration(float("inf")) == "?" and duration(3725) == "1:02:05"


READ_ONLY = """
import errno, os, sys
import sae.outputs, sae.cli


def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


sae.outputs.tempfile.TemporaryFile = read_only
getattr(sae.cli, sys.argv.pop(1))()
"""


@pytest.mark.slow
def test_read_only_outputs_are_one_line_before_any_work(tmp_path):
    """Each tool's console entry point, with every writability probe failing as a read-only file system does:
    one line naming the directory, exit status 2, nothing computed (the corpus and run named do not exist,
    so any work would fail differently) and nothing created."""
    run_dir = "the run directory"
    tools = {  # console entry point in sae/cli.py: (arguments, how the message names the output)
        "lm_train": ([f"corpus.path={tmp_path / 'no_corpus'}", f"hydra.run.dir={tmp_path / 'lm'}"], run_dir),
        "toy_train": ([f"hydra.run.dir={tmp_path / 'toy'}"], run_dir),
        "inspect": ([f"run={tmp_path / 'no_run'}", f"out={tmp_path / 'inspect'}"], "out"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", READ_ONLY, name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        for name, (args, _) in tools.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        where = {"lm_train": "lm", "toy_train": "toy", "inspect": "inspect"}[name]
        expected = f"error: {tools[name][1]} {tmp_path / where} is not writable: the file system is read-only\n"
        assert (proc.returncode, err) == (2, expected), (name, out[-2000:], err[-2000:])
        assert not (tmp_path / where).exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/ either
