import os
import signal
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from nanodist.client import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ParameterServerClient,
    ResourceExhausted,
    SparseGradient,
    adam,
    sgd,
)
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.v1 import tensor_pb2
from nanodist.wire import codec
from tests.conftest import free_port, health_status, nanodist_command, wait_healthy
from tests.integration import bsp_worker


def test_bsp_concurrent_workers_on_two_shards_match_sequential_sgd(start_server):
    workers, steps, lr = 3, 6, 0.05
    shards = [start_server("ps", "--mode", "bsp", "--num-workers", str(workers)) for _ in range(2)]
    addresses = [s.address for s in shards]
    rng = np.random.default_rng(7)
    initial = {k: rng.standard_normal(shape) for k, shape in bsp_worker.SHAPES.items()}
    with ParameterServerClient(addresses) as client:
        client.init(initial, sgd(lr))
        assert {client.shard_index(k) for k in initial} == {0, 1}, "keys should span both shards"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.bsp_worker",
                    ",".join(addresses),
                    str(w),
                    str(steps),
                ]
            )
            for w in range(workers)
        ]
        assert [p.wait(timeout=120) for p in procs] == [0] * workers
        final = client.pull(initial, min_version=steps)
    for key, value in initial.items():
        expected = value.copy()
        for step in range(steps):
            expected -= lr * np.mean([bsp_worker.gradient(w, step, key) for w in range(workers)], axis=0)
        np.testing.assert_allclose(final[key], expected, rtol=1e-10, atol=1e-12)
        assert final.versions[key] == steps


def test_a_retried_request_id_is_applied_once(start_server):
    server = start_server("ps")
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(4, np.float32)}, sgd(1.0))
        grad = {"w": np.ones(4, np.float32)}
        assert client.push(grad, request_id="push-1") == {"w": 1}
        assert client.push(grad, request_id="push-1") == {"w": 1}
        assert client.pull(["w"])["w"].tolist() == [-1.0] * 4
        assert client.stats()[0].pushes_deduplicated == 1


def test_a_retried_streamed_push_is_applied_once(start_server):
    server = start_server("ps")
    with ParameterServerClient([server.address], chunk_bytes=64 << 10) as client:
        client.init({"w": np.zeros(100_000, np.float32)}, sgd(1.0))
        grad = {"w": np.arange(100_000, dtype=np.float32)}
        client.push(grad, request_id="big")
        client.push(grad, request_id="big")
        np.testing.assert_array_equal(client.pull(["w"])["w"], -grad["w"])


def test_client_retries_unavailable_until_the_server_comes_up(tmp_path):
    port = free_port()
    client = ParameterServerClient([f"127.0.0.1:{port}"])
    server = subprocess.Popen(nanodist_command("serve", "ps", "--port", str(port)), stderr=subprocess.DEVNULL)
    try:
        assert client.init({"w": np.zeros(2)}) == {"w": True}  # first attempts hit a closed port
    finally:
        server.terminate()
        server.wait()
        client.close()


@pytest.mark.slow
def test_pull_of_a_300_mb_tensor(start_server):
    server = start_server("ps")
    value = np.arange(75_000_000, dtype=np.float32)  # 300 MB
    with ParameterServerClient([server.address]) as client:
        client.init({"big": value}, adam(1e-3))
        streamed = client.pull(["big"])["big"]
        np.testing.assert_array_equal(streamed, value)
        del streamed
    with ParameterServerClient([server.address], chunk_bytes=512 << 20) as unary:
        np.testing.assert_array_equal(unary.pull(["big"])["big"], value)


def test_sparse_rows_push_and_pull(start_server):
    server = start_server("ps")
    with ParameterServerClient([server.address]) as client:
        client.init({"emb": np.zeros((1000, 4), np.float32)}, sgd(0.5))
        client.push({"emb": SparseGradient(np.array([3, 999, 3]), np.ones((3, 4), np.float32))})
        rows = client.pull(["emb"], rows={"emb": np.array([3, 999, 0])})["emb"]
        assert rows.tolist() == [[-1.0] * 4, [-0.5] * 4, [0.0] * 4]


def test_bsp_pull_waits_for_the_version_and_times_out_clearly(start_server):
    server = start_server("ps", "--mode", "bsp", "--num-workers", "2")
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(2)})
        client.push({"w": np.ones(2)}, step=0)
        with pytest.raises(DeadlineExceeded, match=r"min_version=1, behind: \['w@0'\]"):
            client.pull(["w"], min_version=1, timeout_ms=300)


def raw_stub(address: str) -> tuple[grpc.Channel, callable, callable]:
    channel = grpc.insecure_channel(address)
    push = channel.unary_unary(
        "/nanodist.v1.ParameterServer/Push",
        request_serializer=ps.PushRequest.SerializeToString,
        response_deserializer=ps.PushResponse.FromString,
    )
    init = channel.unary_unary(
        "/nanodist.v1.ParameterServer/Init",
        request_serializer=ps.InitRequest.SerializeToString,
        response_deserializer=ps.InitResponse.FromString,
    )
    return channel, push, init


def dense(key: str, dtype: int, shape: list[int], data: bytes) -> ps.GradientEntry:
    return ps.GradientEntry(key=key, dense=tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data))


BAD_PUSHES = [
    (
        dense("w", tensor_pb2.FLOAT32, [4], b"\0" * 15),
        grpc.StatusCode.INVALID_ARGUMENT,
        "entries[0].dense.data: 15 bytes",
    ),
    (
        dense("w", 77, [4], b"\0" * 16),
        grpc.StatusCode.INVALID_ARGUMENT,
        "entries[0].dense.dtype: unknown dtype 77",
    ),
    (
        dense("missing", tensor_pb2.FLOAT32, [4], b"\0" * 16),
        grpc.StatusCode.NOT_FOUND,
        "'missing' does not exist",
    ),
    (
        dense("w", tensor_pb2.FLOAT32, [2, 2], b"\0" * 16),
        grpc.StatusCode.INVALID_ARGUMENT,
        "entries[0].dense.shape: [2, 2] differs",
    ),
    (
        dense("w", tensor_pb2.FLOAT64, [4], b"\0" * 32),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype float64 differs",
    ),
    (
        dense("", tensor_pb2.FLOAT32, [4], b"\0" * 16),
        grpc.StatusCode.INVALID_ARGUMENT,
        "entries[0].key: must not be empty",
    ),
    (
        dense("k" * 300, tensor_pb2.FLOAT32, [4], b"\0" * 16),
        grpc.StatusCode.INVALID_ARGUMENT,
        "entries[0].key: 300 characters, at most 256",
    ),
]


@pytest.mark.parametrize(("entry", "code", "message"), BAD_PUSHES)
def test_bad_push_gets_a_precise_status_and_leaves_the_server_intact(start_server, entry, code, message):
    server = start_server("ps")
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.arange(4, dtype=np.float32)})
        channel, push, _ = raw_stub(server.address)
        with pytest.raises(grpc.RpcError) as failure:
            push(ps.PushRequest(entries=[entry], request_id="bad"))
        assert failure.value.code() == code
        assert message in failure.value.details()
        channel.close()
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
        values = client.pull(["w"])
        assert values["w"].tolist() == [0, 1, 2, 3] and values.versions["w"] == 0


def test_bad_init_names_the_field(start_server):
    server = start_server("ps")
    channel, _, init = raw_stub(server.address)
    cases = [
        (ps.InitEntry(key="a b", value=codec.to_proto(np.zeros(1))), "entries[0].key"),
        (
            ps.InitEntry(key="x", value=codec.to_proto(np.zeros(1, np.int32))),
            "must be floating point",
        ),
        (
            ps.InitEntry(key="x", value=codec.to_proto(np.zeros(1)), optimizer=ps.Optimizer(learning_rate=-1)),
            "entries[0].optimizer.learning_rate",
        ),
        (ps.InitEntry(key="x"), "entries[0].value: missing"),
    ]
    for entry, message in cases:
        with pytest.raises(grpc.RpcError) as failure:
            init(ps.InitRequest(entries=[entry]))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in failure.value.details()
    channel.close()


def test_typed_client_errors_carry_the_server_message(start_server):
    server = start_server("ps")
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(3)})
        with pytest.raises(NotFound, match="'nope' does not exist"):
            client.pull(["nope"])
        with pytest.raises(InvalidArgument, match=r"shape: \[4\] differs from the key's \[3\]"):
            client.push({"w": np.zeros(4)})


def test_a_message_over_the_limit_is_resource_exhausted(start_server):
    server = start_server("ps", "--max-message-bytes", str(1 << 20))
    with ParameterServerClient([server.address], chunk_bytes=64 << 20) as client:
        client.init({"w": np.zeros(10)})
        with pytest.raises(ResourceExhausted, match="1048576"):
            client.init({"big": np.zeros(300_000)})  # 2.4 MB in one message
        assert client.pull(["w"])["w"].tolist() == [0] * 10
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_health_reflection_and_metrics_are_served(start_server):
    metrics_port = free_port()
    server = start_server("ps", "--metrics-port", str(metrics_port))
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(3, np.float32)})
        client.push({"w": np.ones(3, np.float32)})
    with grpc.insecure_channel(server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {"nanodist.v1.ParameterServer", "grpc.health.v1.Health"} <= set(services)
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'nanodist_requests_total{code="OK",method="Push",service="ps"} 1.0' in body
    assert "nanodist_ps_keys 1.0" in body
    assert "nanodist_request_seconds_bucket" in body


def test_sigterm_stops_gracefully(start_server):
    server = start_server("ps")
    assert server.stop(signal.SIGTERM) == 0


def test_environment_variables_configure_the_server(tmp_path):
    port = free_port()
    env = {"NANODIST_PORT": str(port), "NANODIST_MODE": "bsp", "NANODIST_NUM_WORKERS": "4"}
    process = subprocess.Popen(nanodist_command("serve", "ps"), env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"127.0.0.1:{port}", process)
        with ParameterServerClient([f"127.0.0.1:{port}"]) as client:
            stats = client.stats()[0]
        assert (stats.mode, stats.num_workers) == ("bsp", 4)
    finally:
        process.terminate()
        process.wait()


def test_a_new_client_streams_a_key_larger_than_one_message(start_server):
    server = start_server("ps", "--max-message-bytes", str(8 << 20))
    value = np.arange(3_000_000, dtype=np.float32)  # 12 MB: over the 8 MiB message limit
    with ParameterServerClient([server.address], max_message_bytes=8 << 20) as writer:
        half = value.size // 2  # two keys, each under the limit, on the one shard
        writer.init({"a": value[:half]})
        writer.init({"b": value[half:]})
    with ParameterServerClient([server.address], max_message_bytes=8 << 20) as reader:
        values = reader.pull(["a", "b"])  # sizes unknown to this client: it must ask, then stream
        np.testing.assert_array_equal(np.concatenate([values["a"], values["b"]]), value)


def test_a_pull_waiting_for_its_bsp_step_gets_unavailable_when_the_shard_shuts_down(start_server, tmp_path):
    """The waiting pull is answered before the server stops taking calls (it was cancelled, failing with
    UNKNOWN "Lock is not acquired"); UNAVAILABLE is what clients retry on, against the restarted shard."""
    server = start_server("ps", "--mode", "bsp", "--num-workers", "2")
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(4, np.float32)}, sgd(1.0))
    request = ps.PullRequest(entries=[ps.PullEntry(key="w")], min_version=1, timeout_ms=60_000)
    with grpc.insecure_channel(server.address) as channel:
        pull = channel.unary_unary(
            "/nanodist.v1.ParameterServer/Pull",
            request_serializer=ps.PullRequest.SerializeToString,
            response_deserializer=ps.PullResponse.FromString,
        ).future(request, timeout=60)
        with pytest.raises(grpc.FutureTimeoutError):
            pull.result(timeout=1)  # it waits for a step that no one pushes
        assert server.stop() == 0
        with pytest.raises(grpc.RpcError) as failed:
            pull.result(timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert "shutting down" in failed.value.details()
    log = (tmp_path / f"ps-{server.port}.log").read_text()
    assert "Unexpected" not in log and "Lock is not acquired" not in log, log


def test_a_second_server_on_a_held_port_exits_naming_the_port(start_server):
    first = start_server("ps")
    second = subprocess.run(
        nanodist_command("serve", "ps", "--port", str(first.port)), capture_output=True, text=True, timeout=60
    )
    assert second.returncode != 0
    assert f"--port {first.port}: cannot bind 127.0.0.1:{first.port}" in second.stderr, second.stderr
    assert health_status(first.address) == health_pb2.HealthCheckResponse.SERVING  # the first serves on, alone
