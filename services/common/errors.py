"""Errors that map onto gRPC status codes."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request the service refuses; carries the gRPC status code sent to the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str) -> ServiceError:
    """A bound on resources was reached; the message names the limit."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def failed_precondition(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message)
