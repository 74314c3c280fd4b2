"""Fixtures that start real nanodist servers on free 127.0.0.1 ports."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanodist.client.rpc import ClientSecurity, open_channel
from nanodist.ports import read_port_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_handed_out: set[int] = set()
_started = itertools.count()


def free_host_port() -> int:
    """A port for a container to publish on the host, free now and below the kernel's ephemeral range.

    A port from free_port() comes from that range, where the other test stream's servers and every
    outgoing connection take theirs: it may be taken again in the seconds before docker binds it.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral_start = int(ranges.read().split()[0])
    while True:
        port = random.randrange(10000, ephemeral_start)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def health_status(address: str, timeout: float = 1.0, security: ClientSecurity | None = None) -> int:
    with open_channel(address, security=security or ClientSecurity()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def wait_healthy(
    address: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 30.0,
    security: ClientSecurity | None = None,
) -> None:
    """Poll the standard gRPC health check until SERVING (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before becoming healthy")
        try:
            if health_status(address, timeout=0.5, security=security) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{address} not healthy after {timeout}s")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    args: list[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def nanodist_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanodist.workers.cli", *args]


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., Server]]:
    """start_server("ps", "--mode", "bsp", ...) -> a healthy Server; all are stopped at teardown."""
    servers: list[Server] = []

    def start(
        role: str,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        security: ClientSecurity | None = None,
    ) -> Server:
        # Without a port, the server binds one itself and writes it to a file: no other process holds it.
        port_file = tmp_path / f"{role}-{next(_started)}.port"
        bound = ["--port", str(port)] if port else ["--port", "0", "--port-file", str(port_file)]
        command = nanodist_command("serve", role, *bound, *args)
        log_path = tmp_path / f"{role}-{port or port_file.stem}.log"
        log = open(log_path, "ab")  # noqa: SIM115
        process = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, **(env or {})})
        if not port:
            port = read_port_file(str(port_file), process.poll, 30, f"nanodist serve {role}")
            log_path.rename(tmp_path / f"{role}-{port}.log")  # the name tests read, and a restart appends to
        server = Server(process, port, list(args))
        servers.append(server)
        wait_healthy(server.address, process, security=security)
        return server

    yield start
    for server in servers:
        server.stop()


@dataclass
class EtcdMember:
    """A real etcd member (Debian's etcd-server) on 127.0.0.1, with its data in the test's directory."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


def _start_etcd(directory: str, members: int) -> list[EtcdMember]:
    ports = [(free_host_port(), free_host_port()) for _ in range(members)]
    cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    started = []
    for i, (client, peer) in enumerate(ports):
        log = open(os.path.join(directory, f"etcd-{client}.log"), "ab")  # noqa: SIM115
        command = [
            "etcd", "--name", f"m{i}", "--data-dir", os.path.join(directory, f"etcd-{client}"),
            "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", cluster, "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        started.append(EtcdMember(subprocess.Popen(command, stdout=log, stderr=log), client))
    try:
        for member in started:
            _wait_etcd_healthy(member, directory)
    except RuntimeError:
        _stop(started)
        raise
    return started


def _wait_etcd_healthy(member: EtcdMember, directory: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and member.process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{member.endpoint}/health", timeout=2) as answer:
                if b'"true"' in answer.read():
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"etcd did not become healthy on {member.endpoint}; see {directory}/etcd-{member.port}.log")


def etcd_url(members: list[EtcdMember], namespace: str = "test") -> str:
    """--store for every member of a cluster."""
    return "etcd://" + ",".join(m.endpoint for m in members) + f"/{namespace}"


@pytest.fixture
def etcd_cluster(tmp_path) -> Iterator[list[EtcdMember]]:
    """Three members of Debian's etcd-server forming one cluster (`make test` installs it when missing)."""
    members = _start_etcd(str(tmp_path), 3)
    yield members
    _stop(members)


def _stop(members: list[EtcdMember]) -> None:
    for member in members:
        member.process.kill()
        member.process.wait()


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `pytest -n` (make test runs two streams), the docker tests share one stream: they build the
    same images and one of them makes this engine a swarm, so they must not overlap one another."""
    for item in items:
        if "tests/e2e/" in item.nodeid or item.nodeid.startswith("e2e/"):
            item.add_marker(pytest.mark.xdist_group("docker"))
        if any(f"{tier}/" in item.nodeid.split("::")[0] for tier in ("e2e", "interop")):
            item.add_marker(pytest.mark.slow)  # containers, or a Rust build: make test, not test-fast
