"""`sae-cache` under faults: Ctrl-C, SIGTERM and SIGKILL at a random point, then the same command again, end
with a store byte-identical to an uninterrupted run's (every file, the manifest included: it records no
timings or paths of the run); a full or read-only disk is one line with the complete shards intact and
resumable; a directory holding other files is refused with nothing in it touched; nothing lands in the
working directory."""

import builtins
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import ROOT

import sae.cache as cache_lib
import sae.outputs
from sae.cache import GROUND_TRUTH, cache
from sae.cli import run_job
from sae.config import CacheConfig
from sae.data.store import MANIFEST, PROGRESS, StoreError, checksum, store_bytes
from sae.data.synthetic import SyntheticRowsConfig
from sae.interrupts import Interrupted
from sae.outputs import OutputError, format_bytes

SCRIPT = str(Path(ROOT) / "scripts" / "cache_activations.py")
SHARD_ROWS = 300


def small_cfg(out, **kwargs) -> CacheConfig:
    """3000 rows × 8 (10 shards of 300, chunks of 100): a fraction of a second."""
    source = SyntheticRowsConfig(d_in=8, n_features=24, mean_active=3.0, n_rows=3000)
    return CacheConfig(source=source, out=str(out), **{"shard_rows": SHARD_ROWS, "chunk_rows": 100, **kwargs})


def files_of(directory) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_store(got, expected) -> None:
    """Byte-identical stores: the same file names, and every file's bytes equal."""
    a, b = files_of(got), files_of(expected)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], name


def committed(out) -> list[dict]:
    """The shards an interrupted store's progress file records, each checked against its file."""
    lines = (Path(out) / PROGRESS).read_text().splitlines()[1:]
    shards = [json.loads(line) for line in lines if line.endswith("}")]
    for shard in shards:
        assert checksum(Path(out) / shard["file"]) == shard["checksum"], shard
    return shards


def temporaries(out) -> list[str]:
    return [p.name for p in Path(out).iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted store of small_cfg."""
    out = tmp_path_factory.mktemp("whole") / "store"
    cache(small_cfg(out))
    return out


# --- Ctrl-C and SIGTERM, in this process ----------------------------------------------------------------


def _signal_at(monkeypatch, sig: int, at: int) -> None:
    """Send this process `sig` once the writer has been handed `at` chunks."""
    original = cache_lib._rechunk

    def chunks(source_chunks, size):
        for i, chunk in enumerate(original(source_chunks, size), start=1):
            if i == at:
                os.kill(os.getpid(), sig)
            yield chunk

    monkeypatch.setattr(cache_lib, "_rechunk", chunks)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_last_complete_shard_and_resumes(tmp_path, monkeypatch, capsys, whole, sig):
    at = random.Random().randint(1, 28)  # of 30 chunks of 100 rows
    out, handler = tmp_path / "store", signal.getsignal(sig)
    with monkeypatch.context() as patch, pytest.raises(Interrupted) as stopped:
        _signal_at(patch, sig, at)
        cache(small_cfg(out))
    kept = at * 100 // SHARD_ROWS  # shards complete when the chunk that got the signal was appended
    assert stopped.value.signum == sig
    name = "SIGINT (Ctrl-C)" if sig == signal.SIGINT else "SIGTERM"
    assert str(stopped.value) == (
        f"sae-cache stopped by {name}: {kept * SHARD_ROWS} rows in {kept} complete shards kept in '{out}'; "
        "run the same command again to resume"
    ), at
    assert [s["file"] for s in committed(out)] == [f"shard_{i:05d}.npy" for i in range(kept)]
    assert not (out / MANIFEST).exists() and not temporaries(out)
    for i in range(kept):  # the kept shards are the uninterrupted run's
        assert (out / f"shard_{i:05d}.npy").read_bytes() == (whole / f"shard_{i:05d}.npy").read_bytes()
    assert signal.getsignal(sig) is handler  # given back
    capsys.readouterr()
    cache(small_cfg(out))
    if kept:
        assert f"after its {kept * SHARD_ROWS} stored rows" in capsys.readouterr().out
    assert_same_store(out, whole)


def test_a_stopped_run_reports_its_status_in_one_line(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _signal_at(patch, signal.SIGTERM, 7)
        status = run_job(lambda: cache(small_cfg(tmp_path / "s")))
    assert status == 128 + signal.SIGTERM
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1] == (
        f"sae-cache stopped by SIGTERM: 600 rows in 2 complete shards kept in '{tmp_path / 's'}'; "
        "run the same command again to resume"
    )
    assert len(err) == 2 and err[0].startswith("SIGTERM: stopping sae-cache")  # the notice, then what was kept


# --- full and read-only disks -----------------------------------------------------------------------------


class FullDisk:
    """`open` for the store's writers: files opened for writing take `budget` bytes in all, then a write
    fails with ENOSPC (after writing what fits, as a real full disk does); reads are untouched."""

    def __init__(self, budget: float, code: int = errno.ENOSPC):
        self.left, self.written, self.code = budget, 0, code

    def open(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return _Limited(f, self) if any(c in mode for c in "wax+") else f


class _Limited:
    def __init__(self, f, disk: FullDisk):
        self._f, self._disk = f, disk

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._disk.left:
            fits = int(self._disk.left)
            self._f.write(data[:fits] if isinstance(data, str) else memoryview(data).cast("B")[:fits])
            self._disk.left = 0
            raise OSError(self._disk.code, os.strerror(self._disk.code))
        self._disk.left -= size
        self._disk.written += size
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _full_disk(monkeypatch, disk: FullDisk) -> None:
    for module in (sae.data.store, sae.outputs):
        monkeypatch.setattr(module, "open", disk.open, raising=False)


def _bytes_written(tmp_path, monkeypatch) -> int:
    disk = FullDisk(float("inf"))
    with monkeypatch.context() as patch:
        _full_disk(patch, disk)
        cache(small_cfg(tmp_path / "measured"))
    return disk.written


DISK_FULL = re.compile(
    r"cannot write (?P<path>\S+): no space left on the device; (?P<rows>\d+) rows in (?P<shards>\d+) complete "
    r"shards kept in '(?P<out>\S+)', intact: free some space and run the same command again to resume"
)


@pytest.mark.parametrize("fraction", [0.02, 0.35, "random", 0.999])
def test_a_full_disk_keeps_the_complete_shards_and_resumes(tmp_path, monkeypatch, capsys, whole, fraction):
    """The disk fills at a point of the run (0.02: in ground_truth.npy, 0.999: in the manifest): one line
    naming the file and what is kept, those shards intact, no temporary file, and the same command finishes
    the store."""
    total = _bytes_written(tmp_path, monkeypatch)
    fraction = random.Random().uniform(0.05, 0.95) if fraction == "random" else fraction
    out = tmp_path / "store"
    with monkeypatch.context() as patch:
        _full_disk(patch, FullDisk(int(total * fraction)))
        capsys.readouterr()
        status = run_job(lambda: cache(small_cfg(out)))
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1, err
    match = DISK_FULL.fullmatch(err.removeprefix("error: "))
    assert match, err
    shards = committed(out)
    assert int(match["shards"]) == len(shards) and int(match["rows"]) == SHARD_ROWS * len(shards), fraction
    assert match["out"] == str(out) and Path(match["path"]).parent == out
    if fraction == 0.02:
        assert match["path"] == str(out / GROUND_TRUTH) and not shards
    if fraction == 0.999:
        assert match["path"] == str(out / MANIFEST) and len(shards) == 10
    assert not temporaries(out) and not (out / MANIFEST).exists()
    for shard in shards:
        assert (out / shard["file"]).read_bytes() == (whole / shard["file"]).read_bytes()
    cache(small_cfg(out))
    assert_same_store(out, whole)


def test_a_read_only_disk_is_one_line(tmp_path, monkeypatch, capsys, whole):
    """Read-only before the work (found by check_writable, nothing created) and mid-run (the shards kept)."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    out = tmp_path / "store"
    with monkeypatch.context() as patch:
        patch.setattr(sae.outputs.tempfile, "TemporaryFile", read_only)
        status = run_job(lambda: cache(small_cfg(out)))
    assert status != 0
    assert capsys.readouterr().err == f"error: out {out} is not writable: the file system is read-only\n"
    assert not out.exists()

    with monkeypatch.context() as patch:
        _full_disk(patch, FullDisk(30_000, code=errno.EROFS))
        status = run_job(lambda: cache(small_cfg(out)))
    err = capsys.readouterr().err
    kept = committed(out)
    assert status == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot write {out}/shard_") and ": the file system is read-only; " in err
    assert err.endswith(
        f"{SHARD_ROWS * len(kept)} rows in {len(kept)} complete shards kept in '{out}', intact: "
        f"make '{out}' writable and run the same command again to resume\n"
    )
    assert not temporaries(out)
    cache(small_cfg(out))
    assert_same_store(out, whole)


def test_too_little_room_is_refused_before_anything_is_written(tmp_path, monkeypatch, whole):
    """The estimate is the store's size (at most 1% more); a disk with less free is refused up front; a
    resumed run needs only the rest."""
    actual = sum(len(data) for data in files_of(whole).values())
    estimate = store_bytes(3000, 8, "float16", SHARD_ROWS, False) + len((whole / GROUND_TRUTH).read_bytes())
    assert actual <= estimate <= 1.01 * actual, (estimate, actual)
    usage = namedtuple("usage", "total used free")
    out = tmp_path / "store"
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, actual // 2))
        with pytest.raises(OutputError, match=f"out {out} needs about {format_bytes(estimate)} but its disk has "):
            cache(small_cfg(out))
    assert not out.exists()

    with monkeypatch.context() as patch, pytest.raises(Interrupted):
        _signal_at(patch, signal.SIGINT, 20)  # 6 of 10 shards kept
        cache(small_cfg(out))
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, actual // 2))
        cache(small_cfg(out))  # the rest fits
    assert_same_store(out, whole)


# --- other people's files -----------------------------------------------------------------------------


def _snapshot(directory) -> tuple:
    """Names, bytes and modification times of everything in `directory`, and its own (a file added and
    removed again changes the directory's)."""
    directory = Path(directory)
    return files_of(directory), {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}, directory.stat()


def _unchanged(before: tuple, directory, itself: bool = True) -> None:
    """No file in `directory` changed; with `itself`, nothing was even created in it and removed again."""
    files, times, stat = _snapshot(directory)
    assert files == before[0] and times == before[1]
    assert stat.st_ino == before[2].st_ino
    if itself:
        assert stat.st_mtime_ns == before[2].st_mtime_ns


def test_a_directory_of_other_files_is_refused_untouched(tmp_path, monkeypatch, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    (user / "shard_00000.npy").write_bytes(os.urandom(5000))
    before = _snapshot(user)
    with pytest.raises(StoreError) as refused:
        cache(small_cfg(user))
    assert str(refused.value) == (
        f"out={user} holds files that are not an activation store: notes.txt, shard_00000.npy; "
        "choose an empty directory"
    )
    _unchanged(before, user)
    assert run_job(lambda: cache(small_cfg(user))) == 2
    assert capsys.readouterr().err.count("\n") == 1
    _unchanged(before, user)

    hidden = tmp_path / "hidden"  # a dot file counts too
    hidden.mkdir()
    (hidden / ".keep").write_text("")
    with pytest.raises(StoreError, match=r"holds files that are not an activation store: \.keep;"):
        cache(small_cfg(hidden))

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match=f"out={a_file} is a file, not a directory"):
        cache(small_cfg(a_file))
    assert a_file.read_text() == "x"


def test_an_interrupted_store_with_other_files_or_settings_is_refused_untouched(tmp_path, monkeypatch, whole):
    out = tmp_path / "store"
    with monkeypatch.context() as patch, pytest.raises(Interrupted):
        _signal_at(patch, signal.SIGINT, 12)
        cache(small_cfg(out))
    (out / "notes.txt").write_text("mine\n")
    before = _snapshot(out)
    with pytest.raises(StoreError) as refused:
        cache(small_cfg(out))
    assert str(refused.value) == (
        f"out={out} holds an interrupted cache run and files that are not its: notes.txt; "
        "move them away or choose an empty directory"
    )
    _unchanged(before, out, itself=False)  # (check_writable's test file came and went)
    (out / "notes.txt").unlink()

    before = _snapshot(out)
    with pytest.raises(StoreError) as refused:
        cache(small_cfg(out, dtype="float32", shard_rows=200))
    assert str(refused.value) == (
        f"'{out}' holds an interrupted cache run with other settings (dtype='float16' there but 'float32' here; "
        "shard_rows=300 there but 200 here); resume it with those, or choose another out dir"
    )
    with pytest.raises(StoreError, match=r"other settings \(provenance.seed=0 there but 4 here\)"):
        cache(small_cfg(out, seed=4))
    _unchanged(before, out, itself=False)
    cache(small_cfg(out))  # the same settings: resumed
    assert_same_store(out, whole)
    before = _snapshot(out)
    with pytest.raises(StoreError, match="already holds a complete store"):
        cache(small_cfg(out))
    _unchanged(before, out)


# --- the command line: signals at a random point, SIGKILL, the working directory ------------------------

# ~120k rows of 2048 features in 4 dims, 120 shards: a few seconds of generating, a 1 MB store.
CLI_ARGS = [
    "source=synthetic",
    "source.n_features=2048",
    "source.d_in=4",
    "source.mean_active=3",
    "source.n_rows=120000",
    "shard_rows=1000",
    "chunk_rows=1000",
]
CLI_SOURCE = SyntheticRowsConfig(n_features=2048, d_in=4, mean_active=3.0, n_rows=120_000)


def _env(tmp_path) -> dict:
    cache_dir = os.path.join(tempfile.gettempdir(), "sae-jax-test-cache")
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "TMPDIR": str(tmp_path / "tmp"),
    }


@pytest.fixture(scope="module")
def cli_whole(tmp_path_factory):
    """The uninterrupted store of CLI_ARGS, written in this process (the same function the CLI calls)."""
    out = tmp_path_factory.mktemp("cli_whole") / "store"
    cache(CacheConfig(source=CLI_SOURCE, out=str(out), shard_rows=1000, chunk_rows=1000))
    return out


def _run_cli(out, cwd, env, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, *CLI_ARGS, f"out={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env=env,
        **kwargs,
    )


PROGRESS_LINE = re.compile(r"cache: ([\d,]+)/120,000 rows")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_cli_signal_at_a_random_point_then_resume_is_byte_identical(tmp_path, cli_whole, sig):
    """The signal lands once the progress shows a random 10-50% done; a clean stop says what it kept, in one
    line after the notice, and exits 128 + n; SIGKILL leaves what it leaves. Rerunning the command finishes a
    store byte-identical to the uninterrupted one. The working directory stays empty throughout."""
    cwd, out, env = tmp_path / "cwd", tmp_path / "store", _env(tmp_path)
    cwd.mkdir()
    (tmp_path / "tmp").mkdir()
    at = random.Random().randint(2, 10) * 5  # percent
    proc = _run_cli(out, cwd, env)
    seen = 0
    for line in proc.stdout:
        match = PROGRESS_LINE.match(line)
        if match and int(match[1].replace(",", "")) >= at * 1200:
            seen = int(match[1].replace(",", ""))
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=120)[0]
    assert seen, f"no progress line at {at}%: {rest[-2000:]}"
    assert "Traceback" not in rest, rest[-3000:]
    assert not (out / MANIFEST).exists(), f"finished before the signal at {seen} rows"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        kept = sum(s["rows"] for s in committed(out))
    else:
        assert proc.returncode == 128 + sig, rest[-2000:]
        lines = [line for line in rest.splitlines() if line.strip()]
        name = re.escape("SIGINT (Ctrl-C)" if sig == signal.SIGINT else "SIGTERM")
        stop = re.fullmatch(
            rf"sae-cache stopped by {name}: (\d+) rows in (\d+) complete shards kept in '{re.escape(str(out))}'; "
            "run the same command again to resume",
            lines[-1],
        )
        assert stop, rest[-2000:]
        kept = int(stop[1])
        assert kept == 1000 * int(stop[2]) == sum(s["rows"] for s in committed(out))
        assert kept >= seen // 1000 * 1000, (kept, seen)  # every shard complete at the signal is kept
        notices = [line for line in lines if "stopping sae-cache at the next safe point" in line]
        assert len(notices) == 1 and notices[0].startswith(signal.Signals(sig).name), rest[-2000:]
    done = subprocess.run(
        [sys.executable, SCRIPT, *CLI_ARGS, f"out={out}"], capture_output=True, text=True, cwd=cwd, env=env
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    if kept:
        assert f"after its {kept} stored rows" in done.stdout, (kept, done.stdout[:2000])
    assert_same_store(out, cli_whole)
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_cli_writes_nothing_but_out(tmp_path):
    """A run and a multirun from an empty working directory: the stores in out, nothing in the working
    directory (a multirun's multirun.yaml goes under TMPDIR); a foreign out is refused with exit 2, one line,
    its files untouched."""
    cwd, env = tmp_path / "cwd", _env(tmp_path)
    cwd.mkdir()
    (tmp_path / "tmp").mkdir()
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    small = ["source.n_features=24", "source.d_in=8", "source.n_rows=2000", "shard_rows=500"]
    commands = {
        "run": [*small, f"out={tmp_path / 'one'}"],
        "multirun": ["-m", *small, "seed=0,1", f"out={tmp_path}/seed${{seed}}"],
        "foreign": [*small, f"out={user}"],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env
        )
        for name, args in commands.items()
    }
    results = {name: (proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    for name in ("run", "multirun"):
        (out, err), code = results[name]
        assert code == 0, (name, err[-2000:])
    (_, err), code = results["foreign"]
    assert code == 2 and err == f"error: out={user} holds files that are not an activation store: notes.txt; " + (
        "choose an empty directory\n"
    )
    assert files_of(user) == {"notes.txt": b"mine\n"}
    for store in ("one", "seed0", "seed1"):
        assert (tmp_path / store / MANIFEST).is_file(), store
    assert files_of(tmp_path / "seed0") != files_of(tmp_path / "seed1")
    assert list(cwd.iterdir()) == []
    assert [p.name for p in (tmp_path / "tmp").rglob("multirun.yaml")] == ["multirun.yaml"]
