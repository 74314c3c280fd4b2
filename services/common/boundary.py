"""The boundary between a service's handlers and gRPC: refusals become status codes, calls become metrics.

A handler refuses a request by raising (ServiceError, CodecError, ValueError,
TimeoutError); the decorators here turn that into the matching gRPC status
with the handler's message, turn a request that failed to parse into
INVALID_ARGUMENT, and record every call's status and duration. Anything else
a handler raises is a bug: gRPC answers it with UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from nanodist.services.common.errors import ServiceError, invalid
from nanodist.services.common.handlers import MalformedRequest
from nanodist.services.common.metrics import CallMetrics
from nanodist.wire.codec import CodecError

S = TypeVar("S")  # the servicer
R = TypeVar("R")  # the request (or request iterator)
T = TypeVar("T")  # the response
Context = grpc.aio.ServicerContext

# What a handler raises to refuse a request; everything else escapes as UNKNOWN.
REFUSALS = (ServiceError, CodecError, TimeoutError, ValueError)


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a refusal is answered with."""
    if isinstance(error, ServiceError):
        return error.code, error.message
    if isinstance(error, CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error) or "timed out"
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def _check_parsed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise invalid(request.describe())


def unary(
    service: str, method: str
) -> Callable[[Callable[[S, R, Context], Awaitable[T]]], Callable[[S, R, Context], Coroutine[Any, Any, T]]]:
    """Wrap a handler that answers once (unary or client-streaming) at the gRPC boundary."""

    def decorate(handler: Callable[[S, R, Context], Awaitable[T]]) -> Callable[[S, R, Context], Coroutine[Any, Any, T]]:
        calls = CallMetrics(service, method)

        @functools.wraps(handler)
        async def wrapped(self: S, request: R, context: Context) -> T:
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                _check_parsed(request)
                result = await handler(self, request, context)
                code = "OK"
                return result
            except REFUSALS as error:
                status, message = status_of(error)
                code = status.name
                await context.abort(status, message)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                calls.record(code, time.perf_counter() - start)

        return wrapped

    return decorate


def server_stream(
    service: str, method: str
) -> Callable[[Callable[[S, R, Context], AsyncIterator[T]]], Callable[[S, R, Context], AsyncIterator[T]]]:
    """The same as `unary`, for a handler that streams its answer."""

    def decorate(handler: Callable[[S, R, Context], AsyncIterator[T]]) -> Callable[[S, R, Context], AsyncIterator[T]]:
        calls = CallMetrics(service, method)

        @functools.wraps(handler)
        async def wrapped(self: S, request: R, context: Context) -> AsyncIterator[T]:
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                _check_parsed(request)
                async for item in handler(self, request, context):
                    yield item
                code = "OK"
            except REFUSALS as error:
                status, message = status_of(error)
                code = status.name
                await context.abort(status, message)
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                calls.record(code, time.perf_counter() - start)

        return wrapped

    return decorate
