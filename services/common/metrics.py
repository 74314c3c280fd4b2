"""Prometheus metrics shared by the services, and the decorators that record them."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Gauge, Histogram

from nanodist.services.common.errors import ServiceError, invalid
from nanodist.services.common.handlers import MalformedRequest
from nanodist.wire.codec import CodecError

REQUESTS = Counter("nanodist_requests_total", "RPCs handled", ["service", "method", "code"])
LATENCY = Histogram(
    "nanodist_request_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
BYTES = Counter("nanodist_bytes_total", "Tensor payload bytes", ["service", "direction"])
KEYS = Gauge("nanodist_ps_keys", "Keys held by this parameter-server shard")
KEY_BYTES = Gauge("nanodist_ps_key_bytes", "Bytes of values held by this shard")

log = logging.getLogger("nanodist.rpc")
T = TypeVar("T")


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def rpc(service: str, method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Wrap a unary handler: count and time it, and turn errors into a gRPC status."""

    def decorate(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        # Label lookups cost microseconds; resolve the common ones once.
        latency = LATENCY.labels(service, method)
        ok = REQUESTS.labels(service, method, "OK")

        @functools.wraps(handler)
        async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            start = time.perf_counter()
            try:
                if isinstance(request, MalformedRequest):
                    raise invalid(request.describe())
                result = await handler(self, request, context)
            except (ServiceError, CodecError, TimeoutError, ValueError) as exc:
                code, message = _status(exc)
                REQUESTS.labels(service, method, code.name).inc()
                latency.observe(time.perf_counter() - start)
                await context.abort(code, message)
                raise  # unreachable: abort raises
            except Exception:
                REQUESTS.labels(service, method, "UNKNOWN").inc()
                raise
            ok.inc()
            latency.observe(time.perf_counter() - start)
            return result

        return wrapped

    return decorate


def rpc_stream(
    service: str, method: str
) -> Callable[[Callable[..., AsyncIterator[T]]], Callable[..., AsyncIterator[T]]]:
    """The same as `rpc`, for server-streaming handlers."""

    def decorate(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
        @functools.wraps(handler)
        async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if isinstance(request, MalformedRequest):
                    raise invalid(request.describe())
                async for item in handler(self, request, context):
                    yield item
            except (ServiceError, CodecError, TimeoutError, ValueError) as exc:
                code, message = _status(exc)
                await context.abort(code, message)
            finally:
                REQUESTS.labels(service, method, code.name).inc()
                LATENCY.labels(service, method).observe(time.perf_counter() - start)

        return wrapped

    return decorate
