"""The standard gRPC health check, as a function and as `nanodist health` (for container health checks),
and the wait for SERVING with which a worker starts before any service it needs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanodist.client.errors import Unavailable
from nanodist.client.rpc import ClientSecurity, open_channel

FIRST_PAUSE = 0.1  # seconds between the first rounds of checks; doubled each round up to MAX_PAUSE
# Short enough that workers released together by a service turning healthy still arrive within a
# group's join window of each other.
MAX_PAUSE = 1.0
REPORT_EVERY = 5.0  # seconds between two log lines that name what is still awaited


def check(address: str, service: str = "", timeout: float = 2.0, security: ClientSecurity | None = None) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) of `service` at `address`; raises grpc.RpcError.

    TLS settings come from `security`, or from NANODIST_TLS_* like every client; no token is needed.
    """
    with open_channel(address, security=security) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def wait_serving(
    addresses: Sequence[str],
    timeout: float,
    log: Callable[[str], None] | None = None,
    security: ClientSecurity | None = None,
) -> None:
    """Return once every address answers the health check with SERVING; raise Unavailable after `timeout` s.

    This is how a worker orders its own start-up after the services (no orchestrator feature such as
    compose's depends_on conditions is needed): a name that does not resolve yet, a port that refuses
    and NOT_SERVING are all retried, with backoff. `log` gets a line naming what is still awaited when
    the first round finds something missing, then every REPORT_EVERY seconds, and one when all serve.
    """
    began = time.monotonic()
    deadline = began + timeout
    # Each replica of a service on its own (HOST:PORT,HOST:PORT; a shard's replica set A+B): a client
    # resolves them all when it starts.
    replicas = (r.strip() for a in addresses for r in a.replace("+", ",").split(","))
    waiting = dict.fromkeys(replicas, "not checked")
    pause, reported = FIRST_PAUSE, None
    while True:
        for address in list(waiting):
            state = _state(address, min(2.0, max(0.1, deadline - time.monotonic())), security)
            if state == "SERVING":
                del waiting[address]
            else:
                waiting[address] = state
        now = time.monotonic()
        if not waiting:
            if reported is not None and log is not None:
                log(f"every service is serving after {now - began:.1f} s")
            return
        missing = ", ".join(f"{address} {state}" for address, state in waiting.items())
        if now >= deadline:
            raise Unavailable(f"services not serving after {timeout:g} s: {missing}")
        if log is not None and (reported is None or now - reported >= REPORT_EVERY):
            log(f"waiting for the services: {missing} ({now - began:.0f} s of {timeout:g} s)")
            reported = now
        time.sleep(min(pause, max(0.0, deadline - now)))
        pause = min(pause * 2, MAX_PAUSE)


def _state(address: str, timeout: float, security: ClientSecurity | None) -> str:
    """SERVING, NOT_SERVING, ...; or why the check got no answer ("unreachable" when nothing listens yet)."""
    try:
        return check(address, timeout=timeout, security=security)
    except grpc.RpcError as error:
        code = error.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return "unreachable"
        return f"{code.name}: {error.details()}"


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
