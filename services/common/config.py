"""Server settings shared by every service: flags with NANODIST_* environment defaults, and the exit for a bad one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from nanodist.services.common.errors import ConfigurationError
from nanodist.services.common.security import SecurityConfig, add_security_flags, security_config
from nanodist.settings import env_default

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB; gRPC's hard ceiling is 2 GiB - 1


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    port_file: str = ""  # where the bound port is written once the server serves (for --port 0)
    metrics_port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log_format: str = "text"
    grace_seconds: float = 5.0
    security: SecurityConfig | None = field(default=None)


def add_server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Flags every `nanodist serve` role accepts."""
    parser.add_argument(
        "--host",
        default=env_default("host", "127.0.0.1"),
        help="address to bind (default 127.0.0.1; env NANODIST_HOST)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=env_default("port", default_port),
        help=f"gRPC port (default {default_port}; 0 picks a free one; env NANODIST_PORT)",
    )
    parser.add_argument(
        "--port-file",
        default=env_default("port_file", ""),
        help="write the port the server bound to this file once it serves; with --port 0, how a launcher "
        "learns a port no other process holds (env NANODIST_PORT_FILE)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=env_default("metrics_port", 0),
        help="Prometheus /metrics port (default off; env NANODIST_METRICS_PORT)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=env_default("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        help="largest gRPC message accepted or sent (default 1 GiB)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=env_default("log_format", "text"),
        help="log line format",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=env_default("grace_seconds", 5.0),
        help="time in-flight calls get to finish on SIGTERM",
    )
    add_security_flags(parser)


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server flags as a ServerConfig; checks the security files (raises ConfigurationError)."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        log_format=args.log_format,
        grace_seconds=args.grace_seconds,
        security=security_config(args),
    )


@contextmanager
def exit_on_configuration_error(command: str) -> Iterator[None]:
    """Turn a ConfigurationError into one line on stderr and exit status 2, as argparse does for bad flags."""
    try:
        yield
    except ConfigurationError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
