"""Writing outputs safely: check a directory is writable and has room before any work, write files
whole or not at all (temporary name, fsync, rename), and turn a full or read-only disk into one line.

`OutputError` names the path and the problem; the command-line tools print it as one line and exit 1.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sae.errors import DataError

_DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_ACCESS_ERRORS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


class OutputError(DataError):
    """An output cannot be written (read-only, no permission, disk full); the message names the path."""


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: str | Path, what: str) -> None:
    """Raise OutputError unless files can be created in `directory` (or where it would be created).

    what: how the message names it, e.g. "the run directory" or "out".
    """
    directory = Path(directory)
    where = _existing_parent(directory)
    if not where.is_dir():
        raise OutputError(f"{what} {directory} cannot be created: {where} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = _ACCESS_ERRORS.get(err.errno) or _DISK_ERRORS.get(err.errno) or err.strerror or str(err)
        raise OutputError(f"{what} {directory} is not writable: {reason}") from None


def check_space(directory: str | Path, needed: int, what: str) -> None:
    """Raise OutputError when the file system holding `directory` has fewer than `needed` bytes free."""
    free = shutil.disk_usage(_existing_parent(Path(directory))).free
    if needed > free:
        raise OutputError(
            f"{what} {directory} needs about {format_bytes(needed)} but its disk has {format_bytes(free)} free; "
            "free some space or choose another directory"
        )


def describe(err: OSError, path: str | Path | None = None) -> str | None:
    """One line for a disk-full, read-only or permission error (None for any other OSError)."""
    reason = _DISK_ERRORS.get(err.errno) or _ACCESS_ERRORS.get(err.errno)
    if reason is None:
        return None
    where = path if path is not None else err.filename
    return f"cannot write {where}: {reason}" if where else f"cannot write: {reason}"


@contextlib.contextmanager
def disk_errors(path: str | Path | None = None, kept: str = "") -> Iterator[None]:
    """Turn ENOSPC / EDQUOT / EROFS / EACCES raised inside into one OutputError line.

    kept: what the message adds about the work that survives, e.g. "the last checkpoint, step 300, is intact".
    """
    try:
        yield
    except OSError as err:
        line = describe(err, path)
        if line is None:
            raise
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
