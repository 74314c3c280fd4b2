"""The server runtime every service shares: a grpc.aio server with health,
reflection, Prometheus metrics and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from nanodist.ports import write_port_file
from nanodist.services.common.config import ServerConfig
from nanodist.services.common.errors import ConfigurationError
from nanodist.services.common.security import (
    SecurityConfig,
    TokenAuthInterceptor,
    load_tokens,
    server_credentials,
    warn_if_exposed,
)

log = logging.getLogger("nanodist.server")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


# gRPC turns SO_REUSEPORT on by default: a second server on a port then binds too, and the kernel
# splits connections between the two. A port held by another process must be an error instead.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]


def bind(server: grpc.aio.Server, config: ServerConfig, credentials: grpc.ServerCredentials | None) -> int:
    """Bind the server's port and return it (the one the kernel picked for --port 0).

    Raises ConfigurationError naming the port when another process holds it."""
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise ConfigurationError(
            f"--port {config.port}: cannot bind {address}: another process holds it, or the host is not local"
        )
    return port


async def serve(
    role: str,
    config: ServerConfig,
    register: Callable[[grpc.aio.Server], list[str]],
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    on_stopping: Callable[[], None] | None = None,
    on_serving: Callable[[int], None] | None = None,
) -> None:
    """Run a service until SIGTERM or SIGINT, then drain calls and run `on_shutdown`.

    `register` adds the service's handlers and returns their full names, which
    health and reflection then advertise. `on_stopping` runs as shutdown begins, before
    in-flight calls drain: a service answers its long waits there rather than have them cancelled.
    `on_serving` gets the bound port once the server serves.
    """
    security = config.security or SecurityConfig()
    interceptors = [TokenAuthInterceptor(load_tokens(security.auth_token_file))] if security.auth_token_file else []
    options = channel_options(config.max_message_bytes) + SERVER_OPTIONS
    server = grpc.aio.server(interceptors=interceptors, options=options)
    names = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if security.reflection_enabled:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    port = bind(server, config, server_credentials(security))
    warn_if_exposed(config.host, security)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host)
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "%s serving on %s:%d (metrics port %s)",
        role,
        config.host,
        port,
        config.metrics_port or "off",
    )
    if on_serving is not None:
        on_serving(port)
    if config.port_file:
        write_port_file(config.port_file, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("%s shutting down", role)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if on_stopping is not None:
        on_stopping()
    await server.stop(config.grace_seconds)
    if on_shutdown is not None:
        await on_shutdown()
    log.info("%s stopped", role)
