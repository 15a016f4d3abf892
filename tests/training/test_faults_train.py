"""Faults injected into `sae-train`: signals at random steps, a flipped byte in a checkpoint, a full or
read-only disk, a `resume=` with nothing to resume, a refused run in a finished run's directory. Each ends
in one line (no traceback), loses nothing already saved, and a rerun of the same command ends bit-identical
to an uninterrupted run."""

import contextlib
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import orbax.checkpoint as ocp
import pytest
from conftest import ROOT
from test_checkpoint import _assert_same_run, _cli, _committed_checkpoint, _config, _env, _interrupt, _sigterm_at

import sae.outputs
from sae.checkpoint import CHECKPOINTS, DIGEST, UNREADABLE, Preempted, damage
from sae.data.synthetic import SyntheticBatches
from sae.errors import ConfigError
from sae.interrupts import StopSignals
from sae.outputs import OutputError, OutputRefused
from sae.training import train

TOPK = ["sae=topk", "sae.k=4"]


def _run_cli(run: Path, *extra: str, cwd: str | Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_cli(run, TOPK), *extra], capture_output=True, text=True, env=_env(), cwd=cwd, check=False, timeout=300
    )


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    """The run's stderr, asserted to be one `error:` line and nothing else."""
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


def _tree_bytes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def whole_cli(tmp_path_factory) -> Path:
    """An uninterrupted `sae-train` run (the reference for the interrupted ones)."""
    run = tmp_path_factory.mktemp("cli") / "whole"
    done = _run_cli(run)
    assert done.returncode == 0, done.stderr[-3000:]
    (run.parent / "console.txt").write_text(done.stdout + done.stderr)
    return run


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted in-process run of the topk test config, every 8 steps a checkpoint (5 kept)."""
    run = tmp_path_factory.mktemp("api") / "whole"
    train(_config("topk", keep=5, best_metric=None), run)
    return run


# --- signals -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_at_random_step_then_same_command_is_bit_identical(sig, whole_cli, tmp_path):
    """Ctrl-C and SIGTERM checkpoint the step reached, print one line and exit 130 / 143; SIGKILL loses only
    the steps since the last checkpoint. The same command again ends with the uninterrupted run's weights,
    metrics and log, and nothing printed a traceback."""
    at = random.Random().randint(25, 120)
    code, out = _interrupt(tmp_path / "cut", TOPK, at, sig, after_a_checkpoint=sig == signal.SIGKILL)
    assert "Traceback" not in out, out[-3000:]
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert _committed_checkpoint(tmp_path / "cut")
    else:
        assert code == 128 + sig, out[-3000:]
        name = "SIGINT (Ctrl-C)" if sig == signal.SIGINT else "SIGTERM"
        stopped = int(out.split(f"stopped by {name} at step ")[1].split(";")[0])
        assert stopped >= at
        assert (tmp_path / "cut" / CHECKPOINTS / str(stopped) / DIGEST).is_file()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    done = _run_cli(tmp_path / "cut")
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert "resuming from" in done.stdout, f"interrupted at step {at}: {done.stdout[-2000:]}"
    _assert_same_run(whole_cli, tmp_path / "cut")


def test_second_ctrl_c_aborts_at_once():
    """The first SIGINT asks for a stop (and says so); a second, while stopping, raises KeyboardInterrupt."""
    with StopSignals(what="the test") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- damaged checkpoints ---------------------------------------------------------------------------------


def _flip_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if not data:
        path.write_bytes(b"\x01")
        return
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _stopped_at(step: int, monkeypatch, run: Path, cfg) -> None:
    with monkeypatch.context() as patch, pytest.raises(Preempted):
        _sigterm_at(patch, step)
        train(cfg, run)


def test_any_flipped_byte_is_named(tmp_path, whole, monkeypatch):
    """Every file of a sealed checkpoint, one byte flipped: damage() names that file (or the digest itself)."""
    step_dir = whole / CHECKPOINTS / "40"
    assert damage(step_dir) is None
    rng = random.Random()
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    assert len(files) > 5 and step_dir / DIGEST in files
    for path in files:
        original = path.read_bytes()
        _flip_byte(path, rng)
        try:
            problem = damage(step_dir)
        finally:
            path.write_bytes(original)
        name = str(path.relative_to(step_dir))
        assert problem is not None and (name in problem or DIGEST in problem), (name, problem)


def test_flipped_byte_in_newest_checkpoint_falls_back_bit_identical(tmp_path, whole, monkeypatch):
    """A random file of the newest checkpoint, one byte flipped: the rerun warns naming the file, moves the
    step aside, resumes from the one before and ends with the uninterrupted run's weights."""
    cfg = _config("topk", keep=5, best_metric=None)
    cut = tmp_path / "cut"
    _stopped_at(25, monkeypatch, cut, cfg)  # checkpoints 8, 16, 24, 25
    newest = cut / CHECKPOINTS / "25"
    rng = random.Random()
    target = rng.choice(sorted(p for p in newest.rglob("*") if p.is_file() and p.name != DIGEST))
    _flip_byte(target, rng)
    with pytest.warns(UserWarning, match=f"{newest} is damaged \\({target.relative_to(newest)} differs"):
        train(cfg, cut)
    assert [p.name.split("-")[0] for p in (cut / UNREADABLE).iterdir()] == ["25"]
    _assert_same_run(whole, cut)


def test_resume_with_nothing_readable_is_an_error(tmp_path):
    junk = tmp_path / "J" / CHECKPOINTS / "abc"
    junk.mkdir(parents=True)
    (junk / "f").write_text("z")
    with pytest.raises(ConfigError, match=r"resume=.*holds no readable checkpoint \(found only: abc\)"):
        train(replace(_config("topk"), resume=str(tmp_path / "J")), tmp_path / "Y")
    assert not (tmp_path / "Y" / "metrics.json").exists()


@pytest.mark.slow
def test_cli_resume_with_nothing_readable_is_one_line(tmp_path):
    junk = tmp_path / "J" / CHECKPOINTS
    junk.mkdir(parents=True)
    (junk / "f").write_text("z")
    done = _run_cli(tmp_path / "Y", f"resume={tmp_path / 'J'}")
    assert done.returncode == 2
    assert "holds no readable checkpoint (found only: f)" in _one_line_error(done)
    assert not (tmp_path / "Y").exists()  # a refused run leaves no directory


# --- full and read-only disks ------------------------------------------------------------------------------


class _FullAfter:
    """A text file that takes `room` characters, then fails as a full disk does (ENOSPC)."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, text: str) -> int:
        if len(text) > self.room:
            self.file.write(text[: self.room])
            self.file.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(text)
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def _assert_names_the_intact_checkpoint(error: OutputError, run: Path) -> None:
    """The error names the newest committed checkpoint, and that one verifies against its digest."""
    newest = max(int(p.name) for p in (run / CHECKPOINTS).iterdir() if p.name.isdigit())
    assert f"the last complete checkpoint, {run / CHECKPOINTS / str(newest)}, is intact" in str(error)
    assert damage(run / CHECKPOINTS / str(newest)) is None


def test_disk_full_writing_the_log_keeps_the_checkpoints(tmp_path, whole, monkeypatch):
    """metrics.jsonl hits a full disk halfway through a line: one OutputError line naming the last intact
    checkpoint; the rerun drops the half line and ends bit-identical."""
    cfg = _config("topk", keep=5, best_metric=None)
    cut = tmp_path / "cut"
    opened = Path.open

    def full_log(path, *args, **kwargs):
        file = opened(path, *args, **kwargs)
        return _FullAfter(file, room=1500) if path.name == "metrics.jsonl" else file

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", full_log)
        with pytest.raises(OutputError, match=r"no space left on the device; the last complete checkpoint") as failed:
            train(cfg, cut)
    _assert_names_the_intact_checkpoint(failed.value, cut)
    assert not (cut / "metrics.jsonl").read_text().endswith("\n")  # the half-written line is there
    train(cfg, cut)
    _assert_same_run(whole, cut)


def test_disk_full_in_a_checkpoint_save_keeps_the_previous_one(tmp_path, whole, monkeypatch):
    """orbax's writer fails with ENOSPC on step 24's save (as tensorstore reports it): one line naming step 16
    as intact, no step 24 committed, and the rerun ends bit-identical."""
    cfg = _config("topk", keep=5, best_metric=None)
    cut = tmp_path / "cut"
    save = ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 24:
            raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device [os_error_code='28']")
        return save(self, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ocp.CheckpointManager, "save", failing_save)
        with pytest.raises(OutputError, match=r"no space left on the device; the last complete checkpoint, .*/16,"):
            train(cfg, cut)
    assert sorted(p.name for p in (cut / CHECKPOINTS).iterdir()) == ["16", "8"]
    assert damage(cut / CHECKPOINTS / "16") is None
    train(cfg, cut)
    _assert_same_run(whole, cut)


def test_too_little_room_is_refused_before_any_work(tmp_path, monkeypatch):
    """The estimate (keep + 2 checkpoints of the state, and the export) exceeds the free space: refused up
    front, naming both sizes, nothing trained or checkpointed."""
    cfg = _config("topk")
    free = lambda path: type("Usage", (), {"free": 10_000})()
    monkeypatch.setattr(sae.outputs.shutil, "disk_usage", free)
    with pytest.raises(OutputRefused, match=r"run directory .* needs about [\d.]+ kB but its disk has 10.0 kB free"):
        train(cfg, tmp_path / "r")
    assert not list((tmp_path / "r").rglob("metrics.jsonl"))
    assert not (tmp_path / "r" / CHECKPOINTS).exists() or not any((tmp_path / "r" / CHECKPOINTS).iterdir())


def test_read_only_output_is_refused_before_any_work(tmp_path, read_only_outputs):
    with pytest.raises(OutputRefused, match=r"the run directory .*/r is not writable: the file system is read-only"):
        train(_config("topk"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def _fill(path: Path) -> None:
    """Fill the file system holding `path` with one file (unbuffered: nothing left to fail at its close)."""
    with contextlib.suppress(OSError), open(path, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB file system (skips where mounting is not permitted)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=4m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


# orbax's writer tasks left pending by the failed save may find their event loop closed (the CLI silences it:
# sae/cli.py _quiet_after_a_failed_write)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_real_full_disk_mid_run(small_disk, whole, tmp_path, monkeypatch):
    """A real full disk: filled after step 20, so that orbax's writer fails on step 24's save. One line
    naming step 16 as intact; with the space freed the same run ends bit-identical."""
    cfg = _config("topk", keep=5, best_metric=None)
    run, filler = small_disk / "r", small_disk / "filler"
    batches = SyntheticBatches.train_batches

    def fill_at_20(self, batch_size, n_batches, seed, start_batch=0):
        for i, x in enumerate(batches(self, batch_size, n_batches, seed, start_batch), start=start_batch + 1):
            if i == 20:  # step 16's save may still be in flight: then it fails too, and step 8 is the intact one
                _fill(filler)
            yield x

    with monkeypatch.context() as patch:
        patch.setattr(SyntheticBatches, "train_batches", fill_at_20)
        with pytest.raises(OutputError, match=r"no space left on the device; the last complete checkpoint") as failed:
            train(cfg, run)
    _assert_names_the_intact_checkpoint(failed.value, run)
    filler.unlink()
    train(cfg, run)
    _assert_same_run(whole, run)


@pytest.mark.slow
def test_cli_real_full_disk_mid_run_is_one_line(small_disk):
    """The disk filled from outside once a checkpoint is committed: `sae-train` stops with one line naming
    the intact checkpoint and exit status 1; nothing of orbax's failed save reaches the console."""
    run = small_disk / "r"
    proc = subprocess.Popen(
        [*_cli(run, TOPK), "trainer.total_tokens=3840000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step ") and _committed_checkpoint(run):
                _fill(small_disk / "filler")
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()  # (when the test fails early) the disk can be unmounted
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and "no space left on the device; the last complete checkpoint" in errors[0], err[-3000:]


@pytest.mark.slow
def test_cli_read_only_output_is_one_line(tmp_path):
    disk = tmp_path / "ro"
    if not _mount_tmpfs(disk, "ro,size=1m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        done = _run_cli(disk / "r")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert done.returncode == 2
    assert "is not writable: the file system is read-only" in _one_line_error(done)


# --- refused runs and the run's record ---------------------------------------------------------------------


@pytest.mark.slow
def test_refused_run_leaves_the_finished_run_as_it_was(whole_cli, tmp_path):
    """A different d_sae in a finished run's directory is refused in one line, and every file there
    (.hydra/ record, cli.log, checkpoints, export) keeps its bytes. The finished run's cli.log holds what
    its console showed."""
    before = _tree_bytes(whole_cli)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "cli.log"} <= before.keys()
    done = _run_cli(whole_cli, "sae.d_sae=1024")
    assert done.returncode == 2
    assert "sae.d_sae=512 there but 1024 here" in _one_line_error(done)
    assert _tree_bytes(whole_cli) == before
    log = (whole_cli / "cli.log").read_text()
    assert "final (held-out) whole:" in log and "step 150/150" in log
    console = (whole_cli.parent / "console.txt").read_text()
    assert sorted(log.splitlines()) == sorted(console.splitlines())  # stdout and stderr, as they interleaved


@pytest.mark.slow
def test_refused_fresh_run_leaves_no_directory(tmp_path):
    """A refused run in Hydra's default outputs/DATE/TIME leaves no outputs/ behind."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train_sae.py"), "sae=topk", "sae.k=4", "resume=/nonexistent"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert done.returncode == 2
    assert "resume='/nonexistent'" in _one_line_error(done)
    assert list(tmp_path.iterdir()) == []
