"""Each line a worker prints, prefixed with its job rank and written whole.

`nanodist run` forwards every worker's output under a prefix. A TCP worker is
one process, so the launcher knows its rank; an MPI group is one mpiexec,
whose ranks' output arrives as one stream in which a line of one rank can be
cut by another's. So each worker prefixes its own lines once it knows its
rank, and hands each complete line to the kernel in one write: a pipe keeps
such a write whole (up to PIPE_BUF bytes), and mpiexec passes it on whole.
The launcher adds its own prefix only to lines that carry none.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO, TextIO

PREFIX_VARIABLE = "NANODIST_RANK_PREFIX"  # set by nanodist run: the workers prefix their own lines
RANK_PREFIXED = re.compile(r"\[rank \d+\] ")


def prefix_of(rank: int) -> str:
    return f"[rank {rank}] "


class RankLines(io.TextIOBase):
    """A text stream that writes complete lines, each prefixed with the current rank, to a file descriptor."""

    def __init__(self, original: TextIO, rank: Callable[[], int]) -> None:
        self._original = original  # its .buffer stays reachable for binary writes (unprefixed)
        self._fd = original.fileno()
        self._rank = rank
        self._encoding = getattr(original, "encoding", None) or "utf-8"
        self._partial = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # TextIOBase declares it as an attribute
        return self._encoding

    @property
    def buffer(self) -> BinaryIO:
        return self._original.buffer

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            if lines:
                prefix = prefix_of(self._rank())
                self._emit("".join(f"{prefix}{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        """Complete lines are already written; a partial one waits for its end (or for finish)."""

    def finish(self) -> None:
        """Write a last line that has no end yet (at exit)."""
        with self._lock:
            if self._partial:
                self._emit(f"{prefix_of(self._rank())}{self._partial}\n")
                self._partial = ""

    def _emit(self, text: str) -> None:
        data = text.encode(self._encoding, errors="replace")
        while data:
            data = data[os.write(self._fd, data) :]


def prefix_lines(rank: Callable[[], int]) -> None:
    """Replace sys.stdout and sys.stderr with RankLines streams (once), when nanodist run asked for it."""
    if not os.environ.get(PREFIX_VARIABLE) or isinstance(sys.stdout, RankLines):
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        stream.flush()
        lines = RankLines(stream, rank)
        setattr(sys, name, lines)
        atexit.register(lines.finish)  # registered before the job's shutdown, so it runs after it
