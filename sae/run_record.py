"""A tool's record in its run directory: `.hydra/` (the config, Hydra's settings, the overrides, as Hydra
writes them) and `cli.log` (what the console showed), kept so that a refused run leaves the directory
exactly as it was.

Hydra would write `.hydra/` before the job could refuse anything, so the tools' configs turn that off
(`hydra.output_subdir: null`, no job logging) and `RunRecord` does it instead: it remembers what the
directory held, writes the record, copies stdout and stderr into `cli.log`, and on `close(refused=True)`
puts every file back as it was. A run directory that was empty when the job began (Hydra had just made
it) is removed again with the empty folders the job made in it (never a file), and with Hydra's folders
above it (./outputs/DATE) when they are left empty.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TextIO

from sae.outputs import check_writable, disk_errors

LOG = "cli.log"
HYDRA_ROOTS = ("outputs", "multirun")  # where Hydra's default run dirs live, below the working directory


class _Tee:
    """A text stream writing to the console's stream and to the log file."""

    def __init__(self, console: TextIO, log: TextIO):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self._to_log("write", text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()
        self._to_log("flush")

    def _to_log(self, method: str, *args) -> None:
        """Write or flush the log; once its disk is full the log stops, and the console still shows all."""
        if self.log is not None:
            try:
                getattr(self.log, method)(*args)
            except OSError:
                self.log = None

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the console's
        return getattr(self.console, name)


class RunRecord:
    """The record of one job in `run_dir`. files: {name relative to run_dir: text} (the .hydra/ files).

    open(): check the directory is writable, remember what it held, write the files and start cli.log;
    close(refused): stop the log; when refused, restore every file and drop a directory this run made.
    """

    def __init__(self, run_dir: str | Path, files: dict[str, str]):
        self.run_dir = Path(run_dir).absolute()
        self.files = {**files, LOG: ""}
        self._before: dict[str, bytes | None] = {}
        self._made: list[Path] = []  # directories this run created, outermost first
        self._streams: tuple[TextIO, TextIO] | None = None
        self._log: TextIO | None = None

    def open(self) -> None:
        check_writable(self.run_dir, "the run directory")
        if not self.run_dir.is_dir() or not any(self.run_dir.iterdir()):
            self._made = [*self._default_parents(), self.run_dir]
        for name in self.files:
            path = self.run_dir / name
            self._before[name] = path.read_bytes() if path.is_file() else None
            if not path.parent.exists():
                self._made.append(path.parent)  # .hydra/
        with disk_errors(self.run_dir):
            for name, text in self.files.items():
                path = self.run_dir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if name != LOG:
                    path.write_text(text)
            self._log = open(self.run_dir / LOG, "a", encoding="utf-8")
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._log), _Tee(sys.stderr, self._log)

    def close(self, refused: bool = False) -> None:
        if self._streams is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = self._streams
            self._streams = None
        if self._log is not None:
            with contextlib.suppress(OSError):  # a full disk: what it could not take is lost from the log only
                self._log.close()
            self._log = None
        if refused:
            self._restore()

    def _default_parents(self) -> list[Path]:
        """The folders from ./outputs (or ./multirun) down to the run dir, e.g. outputs/ and DATE/ in
        outputs/DATE/TIME: Hydra's, removed with the run dir when left empty."""
        cwd = Path.cwd().absolute()
        for root in HYDRA_ROOTS:
            if self.run_dir.is_relative_to(cwd / root):
                return [p for p in self.run_dir.parents if p.is_relative_to(cwd / root)][::-1]
        return []

    def _restore(self) -> None:
        for name, before in self._before.items():
            path = self.run_dir / name
            if before is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(before)
        if self._made and self.run_dir.is_dir():  # a fresh run dir: its empty folders (checkpoints/) go too
            for directory in sorted(self.run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
        for directory in reversed(self._made):  # innermost first; only those left empty
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
