"""Every resource bound answers RESOURCE_EXHAUSTED naming the limit, and the server keeps serving."""

import grpc
import numpy as np
import pytest

from nanodist.client import KVStore, LockClient, NanodistError, ParameterServerClient


def exhausted(call) -> str:
    with pytest.raises(NanodistError) as caught:
        call()
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, str(caught.value)
    return str(caught.value)


def test_parameter_server_key_and_byte_limits(start_server):
    server = start_server("ps", "--max-keys", "3", "--max-bytes", "4096")
    with ParameterServerClient([server.address]) as client:
        client.init({f"k{i}": np.zeros(4, np.float32) for i in range(3)})
        assert "--max-keys" in exhausted(lambda: client.init({"k3": np.zeros(4, np.float32)}))
        assert client.pull(["k0"]).versions == {"k0": 0}
    second = start_server("ps", "--max-bytes", "4096")
    with ParameterServerClient([second.address]) as client:
        client.init({"small": np.zeros(512, np.float32)})  # 2 KiB of 4
        assert "--max-bytes" in exhausted(lambda: client.init({"big": np.zeros(1024, np.float32)}))


def test_bsp_steps_running_too_far_ahead_are_refused(start_server):
    server = start_server("ps", "--mode", "bsp", "--num-workers", "2")
    with ParameterServerClient([server.address], worker_id=0) as client:
        client.init({"w": np.zeros(4, np.float32)})
        for step in range(64):  # each waits for worker 1 and holds a full-size sum
            client.push({"w": np.ones(4, np.float32)}, step=step)
        assert "limit 64" in exhausted(lambda: client.push({"w": np.ones(4, np.float32)}, step=64))


def test_lock_and_key_value_limits(start_server):
    server = start_server("lock", "--max-keys", "5")
    with LockClient(server.address, "greedy") as client:
        for i in range(1000):
            assert client.try_acquire(f"l{i}", ttl=60) is not None
        assert "limit 1000" in exhausted(lambda: client.try_acquire("one-more", ttl=60))
    with LockClient(server.address, "modest") as other:
        assert other.try_acquire("one-more", ttl=60) is not None  # the limit is per owner
    with KVStore(server.address) as store:
        for i in range(5):
            store.set(f"k{i}", b"v")
        assert "--max-keys" in exhausted(lambda: store.set("k5", b"v"))
        store.set("k0", b"overwriting is fine")
        assert store.get("k0") == b"overwriting is fine"
