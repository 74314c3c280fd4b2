"""What every client shares: closing as a context manager, and one channel with typed-error calls."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from typing import Any, Self, TypeVar

import grpc

from nanodist.client.errors import from_rpc_error
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
    calls a subclass marks idempotent (or makes so with a request id), and never
    for longer than the call's own timeout, so a call rides through a restart of
    the service that fits in it.
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

    def _within(self, seconds: float) -> RetryPolicy:
        """The retry policy, retrying for no longer than `seconds`."""
        return dataclasses.replace(self.retry, total_seconds=min(self.retry.total_seconds, seconds))

    def _call(
        self, method: Callable[..., T], request: Any, *, timeout: float | None = None, idempotent: bool = False
    ) -> T:
        """One unary call; UNAVAILABLE is retried only when the call is idempotent."""
        deadline = self.timeout if timeout is None else timeout
        return call(method, request, deadline, self.address, self._within(deadline) if idempotent else None)

    def _retried(self, attempt: Callable[[], T], within: float) -> T:
        """Run `attempt` (one call that builds its own request), retrying UNAVAILABLE for up to `within`
        seconds; for calls whose request changes between attempts, such as the time left to wait."""
        try:
            return self._within(within).call(attempt)
        except grpc.RpcError as error:
            raise from_rpc_error(error, self.address) from None

    def close(self) -> None:
        self._channel.close()
