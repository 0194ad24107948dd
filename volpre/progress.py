"""Progress of long commands: a bar on a terminal, plain lines in a log.

A tqdm bar redraws itself with carriage returns, which a batch job's log (SLURM's
``slurm-JOB.out``, a file, a pipe) keeps as one endless line, or not at all. :class:`Progress`
draws the bar only when its stream is a terminal; elsewhere it prints one complete line every
``every`` seconds, and a last one when it closes (a run shorter than ``every`` prints none), e.g.::

    checking: 1200/100000 entries (1.2%), 63.0 entries/s, 19 s elapsed, about 26 min left; 3 with problems
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts work done and shows it (see the module docstring).

    Args:
        what: what is being done (``"checking"``), the start of every line.
        unit: what is counted, singular (``"entry"``; lines say ``entries``).
        total: how many there are, when known (lines then show a percentage and time left).
        stream: where to write (default stderr).
        every: seconds between lines when ``stream`` is not a terminal.
        enabled: False shows nothing.
        clock: seconds, monotonic (for tests).
    """

    def __init__(self, what: str, unit: str, total: int | None = None, stream: TextIO | None = None,
                 every: float = 30.0, enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        if every <= 0:
            raise ValueError(f"progress interval must be > 0 seconds, got {every}")
        self.what, self.unit, self._total = what, unit, total
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.enabled, self.clock = every, enabled, clock
        self.done = 0
        self.details: dict[str, object] = {}
        self.start = self.last_line = clock()
        self.lines = 0
        self.shown = 0
        """``done`` when the last line was printed."""
        isatty = getattr(self.stream, "isatty", None)
        self.bar = tqdm(total=total, unit=unit, desc=what, file=self.stream) if enabled and isatty and isatty() \
            else None

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        """Set once the count is known (e.g. after sharding a manifest)."""
        self._total = value
        if self.bar is not None:
            self.bar.total = value
            self.bar.refresh()

    @property
    def units(self) -> str:
        if self.unit.endswith("y"):
            return self.unit[:-1] + "ies"
        return self.unit if self.unit.endswith("s") else self.unit + "s"

    def update(self, n: int = 1, **details: object) -> None:
        """``n`` more done; ``details`` (``rejected=3``) are shown after the counts."""
        self.done += n
        self.details.update(details)
        if self.bar is not None:
            self.bar.update(n)
            if details:
                self.bar.set_postfix(self.details, refresh=False)
        elif self.enabled and self.clock() - self.last_line >= self.every:
            self._line()

    def line(self) -> str:
        """The progress line for what is done so far."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total} {self.units} ({self.done / max(self.total, 1):.1%})" \
            if self.total is not None else f"{self.done} {self.units}"
        text = f"{self.what}: {count}, {rate:.1f} {self.units}/s, {_duration(elapsed)} elapsed"
        if self.total is not None and rate > 0 and self.done < self.total:
            text += f", about {_duration((self.total - self.done) / rate)} left"
        if self.details:
            text += "; " + ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in self.details.items())
        return text

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line = self.clock()
        self.lines += 1
        self.shown = self.done

    def close(self) -> None:
        """Remove the bar, or print a last line (when earlier lines were printed: short runs print none)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines and self.shown != self.done:
            self._line()
