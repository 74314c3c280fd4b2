"""Channels (plaintext, TLS, mutual TLS, bearer token) and unary calls with typed errors.

Every client opens its channels here, so one set of settings secures them all.
Unless given explicitly, settings come from the environment:
NANODIST_TLS_CA (enables TLS), NANODIST_TLS_CLIENT_CERT and
NANODIST_TLS_CLIENT_KEY (mutual TLS), NANODIST_TLS_SERVER_NAME (override the
name checked against the certificate), NANODIST_AUTH_TOKEN_FILE (first field
of its first line is sent as `authorization: Bearer ...`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from nanodist.client.errors import from_rpc_error
from nanodist.client.replicas import ReplicaChannel
from nanodist.client.retry import RetryPolicy

T = TypeVar("T")
Request = TypeVar("Request")
Response = TypeVar("Response")


@dataclass(frozen=True)
class ClientSecurity:
    """TLS files and the bearer-token file for a client's channels; all None means plaintext, no token."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    token_file: str | None = None

    @classmethod
    def from_env(cls) -> ClientSecurity:
        env = os.environ.get
        return cls(
            env("NANODIST_TLS_CA"),
            env("NANODIST_TLS_CLIENT_CERT"),
            env("NANODIST_TLS_CLIENT_KEY"),
            env("NANODIST_TLS_SERVER_NAME"),
            env("NANODIST_AUTH_TOKEN_FILE"),
        )

    def token(self) -> str | None:
        if not self.token_file:
            return None
        with open(self.token_file) as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if fields:
                    return fields[0]
        raise ValueError(f"token_file {self.token_file}: no token in it (blank lines and # comments only)")


@dataclass
class _CallDetails(grpc.ClientCallDetails):
    """Call details with one more metadata entry; grpc reads them by attribute."""

    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call's metadata."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), self.header),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Request], grpc._CallFuture[Response]],
        client_call_details: grpc.ClientCallDetails,
        request: Request,
    ) -> grpc._CallFuture[Response]:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Request], grpc._CallIterator[Response]],
        client_call_details: grpc.ClientCallDetails,
        request: Request,
    ) -> grpc._CallIterator[Response]:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[Request]], grpc._CallFuture[Response]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Request],
    ) -> grpc._CallFuture[Response]:
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Iterator[Request]], grpc._CallIterator[Response]],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Request],
    ) -> grpc._CallIterator[Response]:
        return continuation(self._with_token(client_call_details), request_iterator)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


# A server that restarts (a crashed shard, a rescheduled container) must be found again within a
# second of coming back: gRPC otherwise waits up to 2 minutes between reconnection attempts, and
# re-resolves a name at most every 30 s, which misses a task that came back under a new address
# (a Swarm task behind dnsrr, a Kubernetes pod).
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
]


def open_channel(
    address: str, options: list[tuple[str, Any]] | None = None, security: ClientSecurity | None = None
) -> grpc.Channel:
    """A channel to `address`, secured by `security` (None: from NANODIST_TLS_* and
    NANODIST_AUTH_TOKEN_FILE). "HOST:PORT,HOST:PORT" names replicas of one service (ReplicaChannel)."""
    security = security or ClientSecurity.from_env()
    if "," in address:
        replicas = [a.strip() for a in address.split(",") if a.strip()]
        return ReplicaChannel(replicas, lambda one: open_channel(one, options, security))
    options = [*RECONNECT_OPTIONS, *(options or [])]
    if security.ca:
        credentials = grpc.ssl_channel_credentials(_read(security.ca), _read(security.key), _read(security.cert))
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = security.token()
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


def call(method: Callable[..., T], request: Any, timeout: float, address: str, retry: RetryPolicy | None = None) -> T:
    """Invoke a unary method; UNAVAILABLE is retried when `retry` is given (idempotent calls only)."""
    try:
        if retry is None:
            return method(request, timeout=timeout)
        return retry.call(lambda: method(request, timeout=timeout))
    except grpc.RpcError as error:
        raise from_rpc_error(error, address) from None


def trailing(error: grpc.RpcError, key: str) -> str | None:
    """The value of a trailing-metadata entry of a failed call, or None."""
    for entry in error.trailing_metadata() or ():
        if entry.key == key:
            # A text entry arrives as str; the stubs type every value as bytes.
            return entry.value if isinstance(entry.value, str) else entry.value.decode()
    return None
