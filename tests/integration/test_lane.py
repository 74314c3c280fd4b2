"""The tensor lane against real shards: the same answers as gRPC on every carrier, and a shard that
refuses whatever a lane connection sends it wrongly, keeps serving and changes nothing."""

import os
import select
import signal
import socket
import subprocess

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanodist.client import ParameterServerClient, SparseGradient, sgd
from nanodist.client.lane import Lane
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec, lane
from tests.conftest import nanodist_command

CARRIERS = {"on": "local", "tcp": "tcp", "off": None}


def carrier(client: ParameterServerClient) -> str | None:
    opened = client.shards[0].lanes.lane
    return opened.carrier if opened is not None and not opened.broken else None


@pytest.mark.parametrize("setting", list(CARRIERS))
def test_push_and_pull_give_the_same_answers_on_every_carrier(start_server, setting):
    shard = start_server("ps")
    with ParameterServerClient(shard.address, lanes=setting) as client:
        big = np.arange(3 << 20, dtype=np.float32)  # 12 MiB: streamed when it goes over gRPC
        client.init({"big": np.zeros_like(big), "half": np.zeros(5, np.float16), "emb": np.zeros((6, 3))}, sgd(1.0))
        client.push({"big": -big, "half": np.full(5, -0.5, np.float16)})
        client.push({"emb": SparseGradient(np.array([1, 4, 1]), -np.ones((3, 3)))})
        out = np.empty_like(big)
        values = client.pull(["big", "half", "emb"], out={"big": out})
        assert values["big"] is out and np.array_equal(out, big)
        assert values["half"].dtype == np.float16 and np.array_equal(values["half"], np.full(5, 0.5, np.float16))
        assert values["emb"][1].tolist() == [2, 2, 2] and values["emb"][4].tolist() == [1, 1, 1]
        assert values.versions == {"big": 1, "half": 1, "emb": 1}
        rows = client.pull(["emb"], rows={"emb": np.array([4, 0])})["emb"]
        assert rows.tolist() == [[1, 1, 1], [0, 0, 0]]
        assert carrier(client) == CARRIERS[setting]


def test_arrays_a_pull_returned_stay_as_they_were_after_later_calls(start_server):
    """The lane reuses its memory from call to call: what it returned must not be that memory."""
    shard = start_server("ps")
    with ParameterServerClient(shard.address) as client:
        client.init({"w": np.zeros(1000)}, sgd(1.0))
        first = client.pull(["w"])["w"]
        client.push({"w": -np.ones(1000)})
        second = client.pull(["w"])["w"]
        assert carrier(client) == "local"
        assert not first.any() and (second == 1).all()


@pytest.mark.parametrize("setting", ["on", "tcp"])
def test_a_bsp_step_sums_table_rows_that_a_lane_pushed_before_reusing_its_memory(start_server, setting):
    """The first push of a step is held until the step completes; the same client's next push, written
    into the same lane memory, must not change it."""
    shard = start_server("ps", "--mode", "bsp", "--num-workers", "2")
    a = ParameterServerClient(shard.address, worker_id=0, lanes=setting)
    b = ParameterServerClient(shard.address, worker_id=1, lanes=setting)
    with a, b:
        a.init_table("emb", 10, 2, optimizer=sgd(1.0))
        initial = a.pull_rows({"emb": np.arange(10)})["emb"]
        a.push_rows({"emb": SparseGradient(np.array([1, 2]), -np.ones((2, 2), np.float32))}, step=0)
        a.push_rows({"emb": SparseGradient(np.array([7, 8]), -np.ones((2, 2), np.float32))}, step=1)
        b.push_rows({"emb": SparseGradient(np.array([3]), -np.ones((1, 2), np.float32))}, step=0)
        values = a.pull_rows({"emb": np.arange(10)}, min_version=1)["emb"]
        assert carrier(a) == CARRIERS[setting]
    assert np.round(values - initial, 5)[:, 0].tolist() == [0, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0]


def test_a_lane_cut_after_the_shard_applied_a_push_is_retried_and_applied_once(start_server, monkeypatch):
    shard = start_server("ps")
    with ParameterServerClient(shard.address) as client:
        client.init({"w": np.zeros(4)}, sgd(1.0))
        client.pull(["w"])  # the lane is open
        answer = Lane._answer
        cut = []

        def cut_once(self: Lane) -> memoryview:
            if not cut:  # the request went out and the shard applied it; its answer is lost with the connection
                cut.append(True)
                assert select.select([self.sock], [], [], 30)[0], "the shard never answered"  # so: it applied it
                self.sock.recv(1 << 16)  # the answer, dropped: what a cut connection loses
                self.sock.shutdown(socket.SHUT_RDWR)
            return answer(self)

        monkeypatch.setattr(Lane, "_answer", cut_once)
        client.push({"w": -np.ones(4)})
        assert cut and client.pull(["w"])["w"].tolist() == [1, 1, 1, 1]
        stats = client.stats()[0]
        assert (stats.pushes_applied, stats.pushes_deduplicated) == (1, 1)
        assert carrier(client) == "local"  # opened again


def test_a_shard_killed_and_restarted_is_reached_on_a_new_lane_and_leaves_nothing_in_dev_shm(start_server):
    before = set(os.listdir("/dev/shm"))
    shard = start_server("ps")
    with ParameterServerClient(shard.address) as client:
        client.init({"w": np.zeros(4)}, sgd(1.0))
        client.push({"w": -np.ones(4)})
        assert carrier(client) == "local"
        mapped = os.readlink(f"/proc/{shard.process.pid}/map_files/" + _memfd_mapping(shard.process.pid))
        assert "memfd:nanodist-lane" in mapped
        shard.stop(signal.SIGKILL)
        restarted = start_server("ps", port=shard.port)
        client.init({"w": np.zeros(4)}, sgd(1.0))
        client.push({"w": -np.ones(4)})
        assert client.pull(["w"])["w"].tolist() == [1, 1, 1, 1]
        assert carrier(client) == "local"
        restarted.stop(signal.SIGKILL)
    assert set(os.listdir("/dev/shm")) <= before


def _memfd_mapping(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            if "memfd:nanodist-lane" in line:
                return line.split()[0]
    raise AssertionError(f"process {pid} maps no lane region")


def test_a_shard_without_lanes_is_reached_over_grpc(start_server):
    shard = start_server("ps", "--lanes", "off")
    with ParameterServerClient(shard.address) as client:
        client.init({"w": np.zeros(4)}, sgd(1.0))
        client.push({"w": -np.ones(4)})
        assert client.pull(["w"])["w"].tolist() == [1, 1, 1, 1]
        assert carrier(client) is None and not client.shards[0].lanes.enabled


def test_a_lane_port_another_process_holds_is_refused_naming_it(start_server):
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    with holder:
        done = subprocess.run(
            nanodist_command("serve", "ps", "--port", "0", "--lane-port", str(port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert f"--lane-port {port}" in done.stderr


# --- bad input on a raw lane connection ----------------------------------------------------------


class RawLane:
    """A TCP lane connection driven by hand."""

    def __init__(self, address: str) -> None:
        channel = grpc.insecure_channel(address)
        self.info = channel.unary_unary(
            "/nanodist.v1.ParameterServer/OpenLane",
            request_serializer=ps.OpenLaneRequest.SerializeToString,
            response_deserializer=ps.OpenLaneResponse.FromString,
        )(ps.OpenLaneRequest(), timeout=10)
        channel.close()
        self.sock = socket.create_connection(("127.0.0.1", self.info.tcp_port), timeout=10)

    def hello(self, secret: bytes | None = None) -> tuple[int, str]:
        self.sock.sendall(lane.MAGIC + (self.info.secret if secret is None else secret))
        return self.answer()

    def answer(self) -> tuple[int, str]:
        status, _, _, length = lane.recv_header(self.sock)
        body = bytearray(length)
        lane.recv_exact(self.sock, memoryview(body))
        return status, body.decode(errors="replace") if status else ""

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def drain(self) -> None:
        """Send nothing more, and read whatever answers come until the shard closes the connection."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            pass  # the shard closed first (and reset what was still unread)


def push_frame(value: float, request_id: str) -> bytes:
    body = codec.encode_push([codec.Entry(key="w", dense=np.full(4, value))], 0, 0, request_id)
    return lane.HEADER.pack(lane.PUSH, 0, 0, 0, len(body)) + body


@pytest.fixture
def shard(start_server):
    server = start_server("ps", "--max-message-bytes", str(1 << 20))
    with ParameterServerClient(server.address, lanes="off") as client:
        client.init({"w": np.zeros(4)}, sgd(1.0))
    return server


def unchanged(shard) -> None:
    """The shard still serves, on its lane too, and holds what it held."""
    with ParameterServerClient(shard.address, lanes="tcp") as client:
        assert client.pull(["w"])["w"].tolist() == [0, 0, 0, 0]
        assert client.stats()[0].pushes_applied == 0
        assert carrier(client) == "tcp"


def test_a_wrong_secret_is_refused_and_the_connection_closed(shard):
    raw = RawLane(shard.address)
    status, message = raw.hello(secret=bytes(lane.SECRET_BYTES))
    assert status == grpc.StatusCode.UNAUTHENTICATED.value[0] and "secret" in message
    assert raw.closed()
    unchanged(shard)


def test_a_frame_whose_length_lies_or_that_ends_early_changes_nothing(shard):
    raw = RawLane(shard.address)
    assert raw.hello() == (0, "")
    frame = push_frame(1.0, "lies")
    raw.sock.sendall(frame[:-8])  # the header promises 8 bytes more than ever come
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.closed()
    unchanged(shard)


def test_an_oversized_frame_and_an_unknown_method_are_refused_by_name(shard):
    raw = RawLane(shard.address)
    raw.hello()
    raw.sock.sendall(lane.HEADER.pack(lane.PUSH, 0, 0, 0, 1 << 40))
    status, message = raw.answer()
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and f"{1 << 40} bytes" in message
    assert raw.closed()
    raw = RawLane(shard.address)
    raw.hello()
    raw.sock.sendall(lane.HEADER.pack(9, 0, 0, 0, 0))
    status, message = raw.answer()
    assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "unknown lane method 9" in message
    unchanged(shard)


def test_a_malformed_push_is_refused_and_the_connection_goes_on(shard):
    raw = RawLane(shard.address)
    raw.hello()
    garbage = b"\x0a\xff\xff\xff\xff\x0f"
    raw.sock.sendall(lane.HEADER.pack(lane.PUSH, 0, 0, 0, len(garbage)) + garbage)
    status, message = raw.answer()
    assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0], message
    raw.sock.sendall(push_frame(-1.0, "then-a-good-one"))
    status, _ = raw.answer()
    assert status == lane.OK
    with ParameterServerClient(shard.address, lanes="off") as client:
        assert client.pull(["w"])["w"].tolist() == [1, 1, 1, 1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=200))
def test_garbage_after_the_hello_never_changes_the_shard(shard, garbage):
    raw = RawLane(shard.address)
    raw.hello()
    raw.sock.sendall(garbage)
    raw.drain()
    with ParameterServerClient(shard.address, lanes="off") as client:
        assert client.pull(["w"])["w"].tolist() == [0, 0, 0, 0]


def test_a_push_larger_than_the_lane_carries_is_streamed_over_grpc_and_the_lane_stays(start_server):
    shard = start_server("ps", "--max-message-bytes", str(1 << 20))
    with ParameterServerClient(shard.address, max_message_bytes=1 << 20) as client:
        half = np.ones(150_000, np.float32)  # 600 kB: each fits a message, the two together do not
        for key in ("a", "b"):
            client.init({key: np.zeros_like(half)}, sgd(1.0))
        client.init({"small": np.zeros(4)}, sgd(1.0))
        client.push({"small": -np.ones(4)})
        client.push({"a": -half, "b": -half})  # PushStream in 512 KiB messages
        client.push({"small": -np.ones(4)})
        assert client.pull(["small"])["small"].tolist() == [2, 2, 2, 2]
        assert client.stats()[0].pushes_applied == 3 and (client.pull(["a"])["a"] == 1).all()
        assert carrier(client) == "local" and len(client.shards[0].lanes.lanes) == 1


def test_a_call_that_fails_on_one_shard_leaves_every_lane_usable(start_server):
    from nanodist.client import NotFound

    shards = [start_server("ps") for _ in range(2)]
    with ParameterServerClient([s.address for s in shards]) as client:
        keys = [f"k{i}" for i in range(8)]
        client.init({k: np.zeros(2) for k in keys}, sgd(1.0))
        missing = next(f"gone{i}" for i in range(100) if client.shard_index(f"gone{i}") == 0)
        present = next(k for k in keys if client.shard_index(k) == 1)
        for _ in range(10):  # more than a shard's lanes: none may be left lent
            with pytest.raises(NotFound):
                client.pull([missing, present])
        assert client.pull(keys)["k0"].tolist() == [0, 0]
        assert all(len(s.lanes.lanes) <= 4 for s in client.shards)
        assert carrier(client) == "local"
