"""Progress of a long loop: a tqdm bar on a terminal, whole log lines anywhere else."""

from __future__ import annotations

import sys
import time
from typing import Never, TextIO

from tqdm import tqdm


def say(line: str, stream: TextIO | None = None) -> None:
    """One write per line, so that mpiexec never splices two ranks' lines together."""
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


class Progress:
    """A bar when stderr is a terminal; otherwise plain lines `<desc> <unit> <count>/<total> <status>`.

    A bar redraws itself with carriage returns, which a pipe (CI, containers, the
    prefixed output of `nanodist up`) joins into one enormous line. So off a
    terminal every report is a line of its own: about `lines` of them over
    `total`, the last one always, and, with `every`, at least one per that many
    seconds for a loop that could otherwise stay silent for long.
    """

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        unit: str = "step",
        lines: int = 4,
        every: float | None = None,
        stream: TextIO | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.desc, self.total, self.unit, self.lines, self.every = desc, total, unit, max(1, lines), every
        self.stream = stream
        self.count = 0
        self.shown = 0  # reports made, in units of total/lines
        self.last_line = time.monotonic()
        self.bar: tqdm[Never] | None = None
        if sys.stderr.isatty() if terminal is None else terminal:
            self.bar = tqdm(total=total, desc=desc, leave=False, unit=unit, file=sys.stderr)

    def update(self, n: int = 1, status: str = "") -> None:
        """`n` more done; `status` (e.g. the loss) goes after the count."""
        self.count += n
        if self.bar is not None:
            if status:
                self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(n)
            return
        share = self.count * self.lines // self.total if self.total > 0 else self.shown + 1
        due = self.every is not None and time.monotonic() - self.last_line >= self.every
        if share > self.shown or self.count == self.total or due:
            self.shown = share
            self.last_line = time.monotonic()
            say(f"{self.desc} {self.unit} {self.count}/{self.total}" + (f" {status}" if status else ""), self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
