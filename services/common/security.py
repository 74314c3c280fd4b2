"""TLS (with certificate reload), bearer-token authentication and roles, for every server.

Token files hold one `TOKEN ROLE` pair per line (# starts a comment). Roles:
`reader` may read (pull, status, get, wait), `worker` may also write (push,
barriers, locks, key-value), `admin` may also reset barriers. Health checks
stay open so that orchestrators can probe without a token.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from nanodist.services.common.errors import ConfigurationError
from nanodist.services.common.pemfiles import check_certificate, check_private_key, read_file
from nanodist.settings import env_optional

log = logging.getLogger("nanodist.security")
ROLES = ("reader", "worker", "admin")
READ_ONLY = {
    "/nanodist.v1.ParameterServer/Pull",
    "/nanodist.v1.ParameterServer/PullStream",
    "/nanodist.v1.ParameterServer/ListKeys",
    "/nanodist.v1.ParameterServer/Stats",
    "/nanodist.v1.Barrier/Status",
    "/nanodist.v1.Lock/Status",
    "/nanodist.v1.KeyValue/Get",
    "/nanodist.v1.KeyValue/Wait",
}
ADMIN_ONLY = {"/nanodist.v1.Barrier/Reset"}
OPEN = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class SecurityConfig:
    """A server's TLS and token settings. Constructing one checks them, and every file they name.

    The checks run at start-up, before the server binds, so that a missing or
    wrong file is refused with the flag's name instead of gRPC's "Failed to
    bind to address". Raises ConfigurationError.
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    reflection: bool | None = None  # None: on unless auth is on

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigurationError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.tls_cert:
            check_certificate("--tls-cert", self.tls_cert)
        if self.tls_key:
            check_private_key("--tls-key", self.tls_key)
        if self.tls_client_ca:
            check_certificate("--tls-client-ca", self.tls_client_ca)
        if self.auth_token_file:
            load_tokens(self.auth_token_file)

    @property
    def reflection_enabled(self) -> bool:
        return self.reflection if self.reflection is not None else self.auth_token_file is None


def add_security_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", default=env_optional("tls_cert"), help="server certificate (PEM); enables TLS")
    parser.add_argument("--tls-key", default=env_optional("tls_key"), help="server private key (PEM)")
    parser.add_argument(
        "--tls-client-ca",
        default=env_optional("tls_client_ca"),
        help="CA that client certificates must chain to; enables mutual TLS",
    )
    parser.add_argument(
        "--auth-token-file",
        default=env_optional("auth_token_file"),
        help="file of 'TOKEN ROLE' lines; enables token authentication",
    )
    parser.add_argument(
        "--reflection",
        choices=["on", "off"],
        default=env_optional("reflection"),
        help="server reflection (default: on, off when token authentication is on)",
    )


def security_config(args: argparse.Namespace) -> SecurityConfig:
    """The security flags as a checked SecurityConfig; raises ConfigurationError."""
    reflection = None if args.reflection is None else args.reflection == "on"
    return SecurityConfig(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file, reflection)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials that reload the certificate files when they change on disk (rotation, no restart)."""
    cert, key, client_ca = config.tls_cert, config.tls_key, config.tls_client_ca
    if not cert or not key:
        return None
    paths = [p for p in (cert, key, client_ca) if p]
    seen: tuple[int, ...] = ()

    def stamp() -> tuple[int, ...]:
        return tuple(os.stat(p).st_mtime_ns for p in paths)

    def load() -> grpc.ServerCertificateConfiguration:
        nonlocal seen
        seen = stamp()
        ca = _read(client_ca) if client_ca else None
        return grpc.ssl_server_certificate_configuration([(_read(key), _read(cert))], ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before new handshakes; None keeps the current certificates."""
        try:
            if stamp() == seen:
                return None
            log.info("TLS certificate files changed; reloading")
            return load()
        except OSError as error:
            log.error("cannot reload TLS certificates: %s", error)
            return None

    return grpc.dynamic_ssl_server_credentials(
        load(),
        fetch,  # type: ignore[arg-type]  # the stubs omit that gRPC lets the fetcher return None
        require_client_authentication=bool(client_ca),
    )


def load_tokens(path: str) -> list[tuple[bytes, str]]:
    """The (token, role) pairs of a token file; raises ConfigurationError naming the flag, file and line."""
    flag = f"--auth-token-file {path}"
    try:
        text = read_file("--auth-token-file", path).decode()
    except UnicodeDecodeError:
        raise ConfigurationError(f"{flag}: not a text file of 'TOKEN ROLE' lines") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ROLES:
            raise ConfigurationError(f"{flag}:{number}: expected 'TOKEN ROLE' with ROLE one of {', '.join(ROLES)}")
        tokens.append((fields[0].encode(), fields[1]))
    if not tokens:
        raise ConfigurationError(f"{flag}: no tokens")
    return tokens


def allowed(role: str, method: str) -> bool:
    if role == "admin":
        return True
    if method in ADMIN_ONLY:
        return False
    return role == "worker" or method in READ_ONLY


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer TOKEN` on every call but health checks, in constant time per token."""

    def __init__(self, tokens: list[tuple[bytes, str]]) -> None:
        self.tokens = tokens

    def role_of(self, metadata: Any) -> str | None:
        header = next((value for key, value in metadata or () if key == "authorization"), "")
        presented = header.removeprefix("Bearer ").encode() if header.startswith("Bearer ") else b""
        role = None
        for token, token_role in self.tokens:  # compare against every token: timing reveals nothing
            if hmac.compare_digest(token, presented):
                role = token_role
        return role

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN):
            return handler
        role = self.role_of(details.invocation_metadata)
        if role is None:
            return _denying(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        if not allowed(role, method):
            return _denying(handler, grpc.StatusCode.PERMISSION_DENIED, f"role {role!r} may not call {method}")
        return handler


def _denying(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """The same kind of handler as `handler`, answering every call with `code`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kinds = {"unary_unary": unary, "stream_unary": unary, "unary_stream": streaming, "stream_stream": streaming}
    return handler._replace(**{kind: fn for kind, fn in kinds.items() if getattr(handler, kind) is not None})


def warn_if_exposed(host: str, config: SecurityConfig) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not config.tls_cert and not config.auth_token_file:
        log.warning(
            "!!! serving on %s with neither TLS nor token authentication: anyone who can reach this "
            "port can read and change state. Use --tls-cert/--tls-key and --auth-token-file. !!!",
            host,
        )
