"""Stopping a long job cleanly: Ctrl-C (SIGINT) and SIGTERM ask it to stop at the next safe point.

A job's loop runs inside `StopSignals()` and checks `requested` between units of work (a training step,
a store shard); when set it saves what it has and raises `Interrupted`, whose message says what was kept
and how to continue. The command-line tools print that one line and exit with the shell's status for the
signal (130 for SIGINT, 143 for SIGTERM). A second Ctrl-C while the job is stopping aborts at once
(KeyboardInterrupt), as a user pressing it twice expects.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A job stopped on a signal after saving its work; the message says what was kept and how to resume.

    signum: the signal that asked for the stop (exit_status gives the shell's status for it).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    """'SIGINT (Ctrl-C)' or 'SIGTERM': how a message names the stop request."""
    return "SIGINT (Ctrl-C)" if signum == signal.SIGINT else signal.Signals(signum).name


def exit_status(signum: int) -> int:
    """The shell's status for a process ended by `signum` (128 + n), used after a clean stop."""
    return 128 + int(signum) if os.name == "posix" else 1


class StopSignals:
    """Context: SIGINT and SIGTERM set `requested` (the signal number) instead of ending the process.

    The first signal prints one line saying the job will stop at the next safe point; a second SIGINT
    raises KeyboardInterrupt at once. Only the main thread can install handlers: elsewhere (a notebook's
    worker thread), or with install=False, this does nothing and `requested` stays None. `signals` picks
    which to take (a multi-process run leaves SIGTERM to JAX's preemption service).
    """

    def __init__(self, install: bool = True, signals: tuple[int, ...] = SIGNALS, what: str = "the job"):
        self.requested: int | None = None
        self._install, self._signals, self._what = install, signals, what
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            again = "; press Ctrl-C again to abort at once" if signum == signal.SIGINT else ""
            print(f"\n{signal_name(signum)}: stopping {self._what} at the next safe point{again}", file=sys.stderr)

    def __enter__(self) -> StopSignals:
        if self._install and threading.current_thread() is threading.main_thread():
            for signum in self._signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
