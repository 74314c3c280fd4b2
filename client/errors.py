"""Typed exceptions for failed calls; each carries the server's status and message."""

from __future__ import annotations

import grpc


class NanodistError(Exception):
    """A call failed; `code` is the gRPC status and `message` the server's explanation."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(NanodistError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(NanodistError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(NanodistError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(NanodistError):
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(NanodistError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(NanodistError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(NanodistError):
    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        Aborted,
        DeadlineExceeded,
        ResourceExhausted,
        Unavailable,
    )
}


def from_rpc_error(error: grpc.RpcError, target: str = "") -> NanodistError:
    """The typed exception for a failed call (grpc.RpcError is also a grpc.Call)."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or code.name  # type: ignore[attr-defined]
    if target:
        details = f"{details} [{target}]"
    return _BY_CODE.get(code, NanodistError)(details, code)
