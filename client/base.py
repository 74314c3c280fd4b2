"""What every client shares: closing as a context manager, and one channel with typed-error calls."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, Self, TypeVar

from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import ClientSecurity, call, open_channel

T = TypeVar("T")


def default_member_id() -> str:
    """A name for this process that its peers can read in errors: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Closing:
    """`with Client(...) as client:` closes the client on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServiceClient(Closing):
    """A client of one service at `address`, over one channel.

    `security` gives the TLS files and token file (None: from NANODIST_TLS_* and
    NANODIST_AUTH_TOKEN_FILE, see nanodist.client.rpc). Failed calls raise the
    typed exceptions of nanodist.client.errors; `retry` is used only for the
    calls a subclass marks idempotent.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float,
        retry: RetryPolicy | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = open_channel(address, security=security)

    def _call(
        self, method: Callable[..., T], request: Any, *, timeout: float | None = None, idempotent: bool = False
    ) -> T:
        """One unary call; UNAVAILABLE is retried only when the call is idempotent."""
        deadline = self.timeout if timeout is None else timeout
        return call(method, request, deadline, self.address, self.retry if idempotent else None)

    def close(self) -> None:
        self._channel.close()
