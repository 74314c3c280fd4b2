"""A parameter too big for one shard is split by rows across all of them, and nobody has to notice."""

import numpy as np
import pytest

from nanodist.client import ParameterServerClient, SparseGradient, sgd
from nanodist.client.sharding import part_name, row_ranges


@pytest.fixture
def shards(start_server):
    return [start_server("ps").address for _ in range(2)]


@pytest.mark.slow
def test_a_64_mib_parameter_split_over_two_shards_round_trips_exactly(shards):
    value = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)  # 64 MiB
    grad = np.random.default_rng(1).standard_normal((4096, 4096), dtype=np.float32)
    with ParameterServerClient(shards) as client:
        assert client.init({"big": value, "small": np.zeros(3, np.float32)}, sgd(1.0)) == {"big": True, "small": True}
        pulled = client.pull(["big"])
        np.testing.assert_array_equal(pulled["big"], value)
        assert client.push({"big": grad}) == {"big": 1}
        stats = client.stats()
        names = sorted(k.key for k in client.list_keys())
    assert names == ["big:part0of2", "big:part1of2", "small"]
    assert all(s.total_bytes >= 32 << 20 for s in stats), "each shard holds half of the rows"
    with ParameterServerClient(shards) as stranger:  # never saw the Init: finds the parts by ListKeys
        pulled = stranger.pull(["big", "small"])
        np.testing.assert_array_equal(pulled["big"], value - grad)
        assert pulled.versions["big"] == 1


def test_sparse_rows_of_a_split_key_reach_the_right_shards(shards):
    with ParameterServerClient(shards, split_bytes=1024) as client:
        client.init({"table": np.zeros((10, 64), np.float32)}, sgd(1.0))
        client.push({"table": SparseGradient(np.array([1, 8]), -np.ones((2, 64), np.float32))})
        table = client.pull(["table"])["table"]
    assert table[:, 0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]


def test_the_documented_rule_places_rows(shards):
    """What another language's client must do: part i, rows [i*R//n, (i+1)*R//n), lives on shard i."""
    value = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    with ParameterServerClient(shards, split_bytes=16) as client:
        client.init({"w": value})
    for i, (address, (a, b)) in enumerate(zip(shards, row_ranges(7, 2), strict=True)):
        with ParameterServerClient([address]) as one_shard:
            np.testing.assert_array_equal(one_shard.pull([part_name("w", i, 2)])[part_name("w", i, 2)], value[a:b])


def test_a_key_keeps_the_layout_it_was_created_with(shards):
    value = np.ones((64, 64), np.float32)  # 16 KiB
    with ParameterServerClient(shards, split_bytes=0) as whole:
        whole.init({"w": value})
    with ParameterServerClient(shards, split_bytes=1024) as splitter:
        assert splitter.init({"w": value}) == {"w": False}  # exists whole: not split now
        splitter.push({"w": value})
        names = [k.key for k in splitter.list_keys()]
    assert names == ["w"]


def test_pull_lands_split_streamed_and_small_keys_in_the_callers_arrays(shards):
    values = {
        "split": np.arange(6 << 20, dtype=np.float32).reshape(-1, 1024),  # 24 MiB: split over both shards
        "streamed": np.arange(1 << 20, dtype=np.float32),  # 4 MiB: one shard, streamed in 2 MiB slices
        "small": np.arange(10, dtype=np.float32),  # one message
    }
    with ParameterServerClient(shards) as client:
        client.init(values, sgd(1.0))
        out = {key: np.full_like(value, -1) for key, value in values.items()}
        pulled = client.pull(list(values), out=out)
    for key, value in values.items():
        assert pulled[key] is out[key], f"{key} did not come back in the caller's array"
        np.testing.assert_array_equal(out[key], value)
