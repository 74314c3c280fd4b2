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

from nanodist.services.common.config import ServerConfig
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


async def serve(
    role: str,
    config: ServerConfig,
    register: Callable[[grpc.aio.Server], list[str]],
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run a service until SIGTERM or SIGINT, then drain calls and run `on_shutdown`.

    `register` adds the service's handlers and returns their full names, which
    health and reflection then advertise.
    """
    security = config.security or SecurityConfig()
    interceptors = [TokenAuthInterceptor(load_tokens(security.auth_token_file))] if security.auth_token_file else []
    server = grpc.aio.server(interceptors=interceptors, options=channel_options(config.max_message_bytes))
    names = register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if security.reflection_enabled:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    credentials = server_credentials(security)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
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

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("%s shutting down", role)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(config.grace_seconds)
    if on_shutdown is not None:
        await on_shutdown()
    log.info("%s stopped", role)
