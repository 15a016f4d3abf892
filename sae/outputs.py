"""Writing outputs safely: check a directory is writable and has room before any work, write files
whole or not at all (temporary name, fsync, rename), and turn a full or read-only disk into one line.

`OutputError` names the path and the problem; the command-line tools print it as one line and exit 1, or 2
(as for any refused input) when it is an `OutputRefused`, found before the job did any work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sae.errors import DataError
from sae.progress import si

_DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_ACCESS_ERRORS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


class OutputError(DataError):
    """An output cannot be written (read-only, no permission, disk full); the message names the path."""


class OutputRefused(OutputError):
    """Found before any work: the output directory is not writable or has too little room for the job."""


def format_bytes(n: float) -> str:
    """A size as error messages give it: "27.6 MB"."""
    return si(n, "B", " ")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: str | Path, what: str) -> None:
    """Raise OutputRefused unless files can be created in `directory` (or where it would be created).

    what: how the message names it, e.g. "the run directory" or "out".
    """
    directory = Path(directory)
    where = _existing_parent(directory)
    if not where.is_dir():
        raise OutputRefused(f"{what} {directory} cannot be created: {where} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = _ACCESS_ERRORS.get(err.errno) or _DISK_ERRORS.get(err.errno) or err.strerror or str(err)
        raise OutputRefused(f"{what} {directory} is not writable: {reason}") from None


def check_space(directory: str | Path, needed: int, what: str) -> None:
    """Raise OutputRefused when the file system holding `directory` has fewer than `needed` bytes free."""
    free = shutil.disk_usage(_existing_parent(Path(directory))).free
    if needed > free:
        raise OutputRefused(
            f"{what} {directory} needs about {format_bytes(needed)} but its disk has {format_bytes(free)} free; "
            "free some space or choose another directory"
        )


_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")  # how tensorstore (orbax's writer) reports an OSError


def disk_errno(err: BaseException) -> int | None:
    """The errno of a disk-full, read-only or permission failure behind `err`, or None.

    Looks through the chain of causes, and into the text of errors that wrap one (orbax raises a
    ValueError "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']").
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = err.errno if isinstance(err, OSError) else None
        if code is None:
            match = _OS_ERROR_CODE.search(str(err))
            code = int(match.group(1)) if match else None
        if code in _DISK_ERRORS or code in _ACCESS_ERRORS:
            return code
        err = err.__cause__ or err.__context__
    return None


def describe(err: BaseException, path: str | Path | None = None) -> str | None:
    """One line for a disk-full, read-only or permission error (None for any other error)."""
    code = disk_errno(err)
    if code is None:
        return None
    reason = _DISK_ERRORS.get(code) or _ACCESS_ERRORS[code]
    where = path if path is not None else getattr(err, "filename", None)
    return f"cannot write {where}: {reason}" if where else f"cannot write: {reason}"


@contextlib.contextmanager
def disk_errors(path: str | Path | None = None, kept: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn a disk-full, read-only or permission failure raised inside (disk_errno) into one OutputError line.

    kept: what the message adds about the work that survives, e.g. "the last checkpoint, step 300, is
    intact", or a function giving it at the time of the failure.
    """
    try:
        yield
    except Exception as err:
        line = describe(err, path)
        if line is None:
            raise
        kept = kept() if callable(kept) else kept
        raise OutputError(line + (f"; {kept}" if kept else "")) from None


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a temporary file beside it, fsync, then rename.

    On any failure the temporary file is removed and `path` keeps its previous contents (if any).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replaced_dir(path: str | Path) -> Iterator[Path]:
    """Write a directory whole or not at all: yields a temporary sibling to fill; on success it replaces
    `path` (the old one, if any, is removed after the swap); on failure it is removed and `path` is kept."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def records_up_to(path: str | Path, step: int) -> list[str]:
    """The lines of a JSON-lines log (metrics.jsonl) whose "step" is at most `step`, for a resumed run to
    keep; a last line that a killed run left half-written is dropped."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True) if step and path.exists() else []
    return [line for line in lines if _step_of(line) <= step]


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"] if line.endswith("\n") else float("inf")
    except (ValueError, KeyError, TypeError):
        return float("inf")
