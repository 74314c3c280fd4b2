"""Random bytes to every RPC of every service: a precise status, never UNKNOWN or INTERNAL, and no damage."""

import subprocess

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanodist.client import ParameterServerClient
from nanodist.v1 import barrier_pb2, lock_pb2, parameter_server_pb2
from tests.conftest import free_port, health_status, nanodist_command, wait_healthy

SERVICES = {
    "ps": [parameter_server_pb2.DESCRIPTOR.services_by_name["ParameterServer"]],
    "barrier": [barrier_pb2.DESCRIPTOR.services_by_name["Barrier"]],
    "lock": [lock_pb2.DESCRIPTOR.services_by_name[n] for n in ("Lock", "KeyValue")],
}
METHODS = [
    (role, service.full_name, method)
    for role, services in SERVICES.items()
    for service in services
    for method in service.methods
]


@pytest.fixture(scope="module")
def servers():
    started = {}
    for role in SERVICES:
        port = free_port()
        process = subprocess.Popen(nanodist_command("serve", role, "--port", str(port)), stderr=subprocess.DEVNULL)
        wait_healthy(f"127.0.0.1:{port}", process)
        started[role] = (process, f"127.0.0.1:{port}")
    with ParameterServerClient([started["ps"][1]]) as client:
        client.init({"canary": np.arange(8, dtype=np.float32)})
    yield {role: address for role, (_, address) in started.items()}
    for process, _ in started.values():
        process.terminate()
        process.wait()


def invoke(channel: grpc.Channel, path: str, method, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    if method.client_streaming:
        channel.stream_unary(path)(iter([payload]), timeout=5)
    elif method.server_streaming:
        list(channel.unary_stream(path)(payload, timeout=5))
    else:
        channel.unary_unary(path)(payload, timeout=5)


@pytest.mark.parametrize(("role", "service", "method"), METHODS, ids=[f"{s}/{m.name}" for _, s, m in METHODS])
def test_random_bytes_get_a_precise_status(servers, role, service, method):
    channel = grpc.insecure_channel(servers[role])

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=300))
    def fuzz(payload: bytes) -> None:
        try:
            invoke(channel, f"/{service}/{method.name}", method, payload)
        except grpc.RpcError as error:
            assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                f"{method.name}: {error.code()} {error.details()}"
            )

    try:
        fuzz()
    finally:
        channel.close()


def test_servers_are_healthy_and_unchanged_after_fuzzing(servers):
    for address in servers.values():
        assert health_status(address) == 1  # SERVING
    with ParameterServerClient([servers["ps"]]) as client:
        canary = client.pull(["canary"])
    assert canary["canary"].tolist() == list(range(8)) and canary.versions["canary"] == 0
