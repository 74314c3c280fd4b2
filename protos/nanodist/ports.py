"""The port file: how a server started with --port 0 tells its launcher the port the kernel gave it.

Picking a port by binding port 0 and closing the socket races: another process can take that port
before the server binds it, or a launcher can be handed it twice. A server that binds port 0 itself
holds its port from the start, and writes it to --port-file once it serves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


class PortFileTimeout(TimeoutError):
    """The server did not write its port in time, or exited first."""


def write_port_file(path: str, port: int) -> None:
    """Write the port whole (a temporary file, then a rename), so that a reader never sees half of it."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{port}\n")
    os.replace(temporary, path)


def read_port_file(path: str, exited: Callable[[], int | None], timeout: float, name: str = "server") -> int:
    """Wait until the server writes `path` and return its port.

    exited() is the server's exit status, or None while it runs: a server that exits while starting
    (its port held, a bad flag) is named at once rather than after the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                text = f.read()
            if text.endswith("\n"):
                return int(text)
        except FileNotFoundError:
            pass
        code = exited()
        if code is not None:
            raise PortFileTimeout(f"{name} exited with status {code} while starting")
        if time.monotonic() > deadline:
            raise PortFileTimeout(f"{name} wrote no port to {path} within {timeout:g} s")
        time.sleep(0.02)
