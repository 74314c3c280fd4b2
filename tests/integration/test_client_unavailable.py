"""A service that cannot be reached raises Unavailable (also a ConnectionError) from every client."""

import time

import numpy as np
import pytest

from nanodist.client import (
    BarrierClient,
    KVStore,
    LockClient,
    ParameterServerClient,
    RetryPolicy,
    Unavailable,
)
from tests.conftest import free_port

QUICK = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, total_seconds=0.3)


@pytest.fixture
def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def test_wait_ready_on_a_dead_shard_raises_unavailable(dead_address):
    with ParameterServerClient(dead_address) as client:
        start = time.monotonic()
        with pytest.raises(Unavailable, match=f"parameter server {dead_address} unreachable after 0.3s"):
            client.wait_ready(timeout=0.3)
        assert time.monotonic() - start < 5


def test_init_push_and_pull_on_a_dead_shard_raise_unavailable_after_the_retries(dead_address):
    with ParameterServerClient(dead_address, retry=QUICK, timeout=5) as client:
        with pytest.raises(Unavailable):
            client.init({"w": np.zeros(4, np.float32)})
        with pytest.raises(Unavailable):
            client.push({"w": np.ones(4, np.float32)})
        with pytest.raises(ConnectionError):  # the builtin base, for code that cannot import the client
            client.pull(["w"])


def test_coordination_clients_on_a_dead_server_raise_unavailable(dead_address):
    with KVStore(dead_address, retry=QUICK, timeout=5) as store, pytest.raises(Unavailable):
        store.get("k")
    with LockClient(dead_address, retry=QUICK, timeout=5) as locks, pytest.raises(Unavailable):
        locks.status()
    with pytest.raises(Unavailable):
        BarrierClient(dead_address, "m", retry=QUICK, timeout=5)
