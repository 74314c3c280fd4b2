"""SplitKeys: which keys a client splits by rows across shards, and how rows map onto the parts."""

import numpy as np
import pytest

from nanodist.client import SparseGradient, Values, shard_of
from nanodist.client.split_keys import SplitKeys
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.v1 import tensor_pb2


def test_a_large_key_is_split_by_rows_and_part_i_lives_on_shard_i():
    splits = SplitKeys(shards=3, split_bytes=64)
    value = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    splits.plan("emb", value)
    pieces = splits.dense("emb", value)
    assert [name for name, _ in pieces] == ["emb:part0of3", "emb:part1of3", "emb:part2of3"]
    assert [len(piece) for _, piece in pieces] == [2, 2, 3]
    assert [splits.shard_index(name) for name, _ in pieces] == [0, 1, 2]
    assert splits.shard_index("emb") == shard_of("emb", 3)
    with pytest.raises(ValueError, match=r"'emb' has shape \(7, 4\), got \(6, 4\)"):
        splits.dense("emb", value[:6])


@pytest.mark.parametrize(
    ("shards", "split_bytes", "value"),
    [
        (1, 1, np.zeros((8, 2), np.float32)),  # one shard: nothing to split across
        (2, 0, np.zeros((8, 2), np.float32)),  # splitting off
        (2, 1024, np.zeros((8, 2), np.float32)),  # too small
        (4, 1, np.zeros((3, 2), np.float32)),  # fewer rows than shards
        (2, 1, np.zeros((), np.float32)),  # a scalar has no rows
    ],
)
def test_keys_that_stay_whole(shards, split_bytes, value):
    splits = SplitKeys(shards, split_bytes)
    splits.plan("k", value)
    assert "k" not in splits and not splits and splits.dense("k", value)[0][0] == "k"


def test_sparse_rows_go_to_their_parts_renumbered_from_each_parts_first_row():
    splits = SplitKeys(shards=2, split_bytes=1)
    splits.plan("emb", np.zeros((10, 3), np.float32))
    grad = SparseGradient(np.array([1, 7, 5]), np.arange(9, dtype=np.float32).reshape(3, 3))
    (first, a), (second, b) = splits.sparse("emb", grad)
    assert (first, a.rows.tolist(), a.values[:, 0].tolist()) == ("emb:part0of2", [1], [0.0])
    assert (second, b.rows.tolist(), b.values[:, 0].tolist()) == ("emb:part1of2", [2, 0], [3.0, 6.0])
    only_first = SparseGradient(np.array([0]), np.ones((1, 3), np.float32))
    assert [name for name, _ in splits.sparse("emb", only_first)] == ["emb:part0of2"]


def test_join_gives_the_whole_array_and_the_slowest_parts_version():
    splits = SplitKeys(shards=2, split_bytes=1)
    value = np.arange(12, dtype=np.float64).reshape(6, 2)
    splits.plan("w", value)
    whole, slices = splits.buffer("w")
    values = Values()
    slices["w:part0of2"][:] = value[:3]  # streamed straight into the buffer
    values["w:part0of2"], values.versions["w:part0of2"] = slices["w:part0of2"], 5
    values["w:part1of2"], values.versions["w:part1of2"] = value[3:].copy(), 4  # arrived as its own array
    splits.join("w", values, whole)
    assert list(values) == ["w"] and values.versions == {"w": 4}
    np.testing.assert_array_equal(values["w"], value)


def test_learn_finds_splits_made_by_another_client_only_when_every_part_is_there():
    def info(key: str, rows: int) -> ps.KeyInfo:
        return ps.KeyInfo(key=key, shape=[rows, 4], dtype=tensor_pb2.FLOAT32)

    splits = SplitKeys(shards=2, split_bytes=1)
    splits.learn([info("a:part0of2", 3), info("a:part1of2", 4), info("b:part0of2", 3), info("c:part0of3", 1)])
    split = splits.get("a")
    assert split is not None and split.shape == (7, 4) and split.dtype == np.float32
    assert [(p.key, p.first, p.end) for p in split.parts] == [("a:part0of2", 0, 3), ("a:part1of2", 3, 7)]
    assert "b" not in splits and "c" not in splits
