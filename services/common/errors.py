"""Errors that map onto gRPC status codes, and the error a bad setting raises."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request the service refuses; carries the gRPC status code sent to the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConfigurationError(ValueError):
    """A setting (flag, environment variable or constructor argument) is unusable; the message names it.

    Library classes raise it; only a command-line entry point turns it into an
    exit code, so a program embedding a server can catch it like any error.
    """


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def exhausted(message: str) -> ServiceError:
    """A bound on resources was reached; the message names the limit."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def failed_precondition(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message)
