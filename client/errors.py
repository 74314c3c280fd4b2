"""Typed exceptions for failed calls; each carries the server's status and message.

Three of them also derive from a builtin, so that code which must not import the
client (workers/comm's rendezvous, user callbacks) can still catch them:
DeadlineExceeded is a TimeoutError, NotFound a LookupError and Unavailable a
ConnectionError.
"""

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


class NotFound(NanodistError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(NanodistError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(NanodistError):
    code = grpc.StatusCode.ABORTED


# TimeoutError and ConnectionError are OSErrors; because NanodistError defines
# __init__, OSError keeps the message as the only argument (errno stays None).
class DeadlineExceeded(NanodistError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(NanodistError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(NanodistError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[NanodistError]] = {
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
    """The typed exception for a failed call: the class for its status code, else a NanodistError."""
    code = error.code()
    details = error.details() or code.name
    if target:
        details = f"{details} [{target}]"
    return _BY_CODE.get(code, NanodistError)(details, code)
