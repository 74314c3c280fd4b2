"""A shape whose size passes int64 is refused as too large, naming the field path and the limit."""

from __future__ import annotations

import numpy as np
import pytest

from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.v1 import tensor_pb2
from nanodist.wire import codec

LIMIT = str(codec.MAX_TENSOR_BYTES)


def tensor(shape: list[int], dtype: int = tensor_pb2.FLOAT32) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape)


@pytest.mark.parametrize(
    "shape",
    [
        [2**40, 2**40],  # 2**80 elements: the product itself passes int64
        [2**31, 2**31, 4],  # 2**64 elements: wraps to 0 in int64
        [2**62, 4],  # 2**64 elements
        [2**61, 1],  # elements fit in int64, but their bytes do not
        [0, 2**31, 2**31],  # no elements, but numpy refuses an empty array whose other dimensions pass the limit
    ],
)
def test_an_overflowing_shape_is_too_large(shape: list[int]) -> None:
    with pytest.raises(codec.CodecError) as raised:
        codec.from_proto(tensor(shape), "entries[0].value")
    message = str(raised.value)
    assert message.startswith(f"entries[0].value.shape: {shape} is too large"), message
    assert LIMIT in message


def test_a_push_with_an_overflowing_gradient_names_its_path() -> None:
    request = ps.PushRequest(entries=[ps.GradientEntry(key="w", dense=tensor([2**40, 2**40]))])
    with pytest.raises(codec.CodecError, match=r"^entries\[0\]\.dense\.shape: .* is too large"):
        codec.decode_push(request.SerializeToString())


def test_sparse_values_with_an_overflowing_shape_name_their_path() -> None:
    sparse = tensor_pb2.SparseRows(rows=[0], values=tensor([1, 2**63 - 1], tensor_pb2.FLOAT64))
    request = ps.PushRequest(entries=[ps.GradientEntry(key="e", sparse=sparse)])
    with pytest.raises(codec.CodecError, match=r"^entries\[0\]\.sparse\.values\.shape: .* is too large"):
        codec.decode_push(request.SerializeToString())


def test_a_large_shape_within_the_limit_still_reports_the_missing_bytes_exactly() -> None:
    with pytest.raises(codec.CodecError) as raised:
        codec.from_proto(tensor([2**30, 2**30]))
    assert str(raised.value) == f"tensor.data: 0 bytes, but shape [{2**30}, {2**30}] of float32 needs {2**62}"


def test_an_empty_dimension_is_fine() -> None:
    assert codec.from_proto(tensor([2**40, 0])).shape == (2**40, 0)
    assert codec.from_proto(codec.to_proto(np.zeros((3, 0), np.float32))).shape == (3, 0)
