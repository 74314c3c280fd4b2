"""The standard gRPC health check, as a function and as `nanodist health` (for container health checks)."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanodist.client.rpc import ClientSecurity, open_channel


def check(address: str, service: str = "", timeout: float = 2.0, security: ClientSecurity | None = None) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) of `service` at `address`; raises grpc.RpcError.

    TLS settings come from `security`, or from NANODIST_TLS_* like every client; no token is needed.
    """
    with open_channel(address, security=security) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="host:port of a nanodist service")
    parser.add_argument("--service", default="", help="a service name; empty means the whole server")
    parser.add_argument("--timeout", type=float, default=2.0)


def run(args: argparse.Namespace) -> None:
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as error:
        print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{args.address}: {status}")
    raise SystemExit(0 if status == "SERVING" else 1)
