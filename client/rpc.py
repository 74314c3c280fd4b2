"""Channel set-up and unary calls with typed errors, shared by the coordination clients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from nanodist.client.errors import from_rpc_error
from nanodist.client.retry import RetryPolicy

T = TypeVar("T")


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)


def call(
    method: Callable[..., T],
    request: Any,
    timeout: float,
    address: str,
    retry: RetryPolicy | None = None,
) -> T:
    """Invoke a unary method; UNAVAILABLE is retried when `retry` is given (idempotent calls only)."""
    try:
        if retry is None:
            return method(request, timeout=timeout)
        return retry.call(lambda: method(request, timeout=timeout))
    except grpc.RpcError as error:
        raise from_rpc_error(error, address) from None


def trailing(error: grpc.RpcError, key: str) -> str | None:
    for name, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if name == key:
            return value
    return None
