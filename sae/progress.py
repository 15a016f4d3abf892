"""Progress of a long job: a line every ~5% with the count done, the rate and the time left.

`Progress(total, done, what, unit)`; call `update(count)` as the work advances (cheap: it only prints when
`count` passes the next 5% mark or reaches the total). The rate is measured from the first update on, so
the start-up (compiling, opening files) does not lower it once the work is under way.
"""

from __future__ import annotations

import math
import sys
import time


def duration(seconds: float) -> str:
    """H:MM:SS (or "?" when not known): how ETAs and elapsed times are written."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def si(n: float, unit: str = "", sep: str = "") -> str:
    """n with an SI prefix: si(4e6) = "4.0M", si(27.6e6, "B", " ") = "27.6 MB", si(512, "B", " ") = "512 B"."""
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{sep}{prefix}{unit}"
    return f"{n:.0f}{sep}{unit}"


def rate_text(rate: float) -> str:
    """A rate with its thousands separated, or three significant digits below 100."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


class Progress:
    """Lines `what: count/total unit (pct%), rate unit/s, ETA H:MM:SS`, one per `every` of the total.

    done: the count already done when the job starts (a resumed run); the rate counts only this run's work.
    """

    def __init__(self, total: int, done: int = 0, what: str = "", unit: str = "rows", every: float = 0.05):
        self.total, self.what, self.unit, self.every = max(int(total), 1), what, unit, every
        self.start = (done, time.perf_counter())
        self.warm: tuple[int, float] | None = None  # (count, time) at the first mark
        self.next = self._after(done)

    def _after(self, count: int) -> int:
        """The next count at which a line is printed: the next multiple of every·total above `count`."""
        marks = round(1 / self.every)
        return math.ceil((math.floor(count * marks / self.total) + 1) * self.total / marks)

    def mark(self, count: int, now: float | None = None) -> None:
        """Note the first count reached (once): later rates are measured from it."""
        if self.warm is None:
            self.warm = (count, time.perf_counter() if now is None else now)

    def measure(self, count: int) -> tuple[float, float]:
        """(rate in units/s, seconds left) at `count`: since the first mark once there is one."""
        now = time.perf_counter()
        self.mark(count, now)
        since = self.warm if count > self.warm[0] and now > self.warm[1] else self.start
        rate = (count - since[0]) / max(now - since[1], 1e-9)
        return rate, (self.total - count) / rate if rate > 0 else math.inf

    def line(self, count: int) -> str:
        rate, left = self.measure(count)
        head = f"{self.what}: " if self.what else ""
        return (
            f"{head}{count:,}/{self.total:,} {self.unit} ({100 * count / self.total:.0f}%), "
            f"{rate_text(rate)} {self.unit}/s, ETA {duration(left)}"
        )

    def update(self, count: int) -> None:
        """Print a line when `count` passed the next mark (or is the total); otherwise only note the time."""
        if count < self.next and count < self.total:
            self.mark(count)
            return
        print(self.line(count), file=sys.stdout, flush=True)
        self.next = self._after(count)
