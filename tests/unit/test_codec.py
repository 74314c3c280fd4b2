import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.v1 import tensor_pb2
from nanodist.wire import codec, framing

DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64]


@given(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_roundtrip_preserves_dtype_shape_and_bits(array):
    raw = memoryview(codec.encode_tensor(array))
    decoded = codec.decode_tensor(raw, (0, len(raw)))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


def test_decode_is_a_view_of_the_message():
    data = codec.encode_tensor(np.arange(1000, dtype=np.float32))
    buf = memoryview(data)
    decoded = codec.decode_tensor(buf, (0, len(buf)))
    assert not decoded.flags.owndata and not decoded.flags.writeable
    assert np.shares_memory(decoded, np.frombuffer(data, dtype=np.uint8))


def test_generated_protobuf_reads_hand_framed_bytes_and_vice_versa():
    grad = np.arange(6, dtype=np.float64).reshape(2, 3)
    data = codec.encode_push(
        [
            codec.Entry("w", dense=grad),
            codec.Entry("e", rows=np.array([4, -0 + 2]), values=np.ones((2, 3))),
        ],
        worker_id=3,
        step=9,
        request_id="r-1",
        fencing_token=7,
        membership=codec.Membership(generation=2, pushers=5),
    )
    message = ps.PushRequest.FromString(data)
    assert (message.worker_id, message.step, message.request_id, message.fencing_token) == (
        3,
        9,
        "r-1",
        7,
    )
    assert (message.generation, message.pushers) == (2, 5)
    assert list(message.entries[0].dense.shape) == [2, 3]
    assert np.frombuffer(message.entries[0].dense.data, "<f8").tolist() == grad.ravel().tolist()
    assert list(message.entries[1].sparse.rows) == [4, 2]
    # and the other way: a stock-protobuf message decodes on the fast path
    decoded = codec.decode_push(message.SerializeToString())
    assert decoded.entries[0].dense.tolist() == grad.tolist()
    assert decoded.entries[1].rows.tolist() == [4, 2]
    assert decoded.membership == codec.Membership(2, 5)


def test_pull_response_fields_are_not_confused_with_push_fields():
    data = codec.encode_pull_response([codec.Entry("w", dense=np.ones(3, np.float32), version=5)])
    (entry,), slowest = codec.decode_pull_response(data)
    assert slowest == 0
    assert (entry.version, entry.offset) == (5, 0)
    assert ps.PullResponse.FromString(data).entries[0].version == 5


def test_negative_ints_use_twos_complement_like_protobuf():
    message = ps.PullRequest(worker_id=-1, min_version=-5)
    assert framing.varint(-1) == ps.PullRequest(worker_id=-1).SerializeToString()[1:]
    assert ps.PullRequest.FromString(message.SerializeToString()).worker_id == -1


def _tensor(**fields) -> memoryview:
    return memoryview(tensor_pb2.Tensor(**fields).SerializeToString())


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (
            {"dtype": tensor_pb2.FLOAT32, "shape": [2, 2], "data": b"\0" * 15},
            "tensor.data: 15 bytes",
        ),
        ({"dtype": 42, "shape": [1], "data": b"\0" * 4}, "tensor.dtype: unknown dtype 42"),
        (
            {"dtype": tensor_pb2.DTYPE_UNSPECIFIED, "shape": [1], "data": b"\0" * 4},
            "unknown dtype 0",
        ),
        ({"dtype": tensor_pb2.FLOAT32, "shape": [-1, 4], "data": b""}, "negative dimension"),
        ({"dtype": tensor_pb2.FLOAT32, "shape": [1] * 17, "data": b"\0" * 4}, "17 dimensions"),
    ],
)
def test_inconsistent_tensors_are_rejected_with_the_field_named(fields, error):
    buf = _tensor(**fields)
    with pytest.raises(codec.CodecError, match=error):
        codec.decode_tensor(buf, (0, len(buf)))


def test_truncated_message_is_an_error_not_a_crash():
    data = codec.encode_push([codec.Entry("w", dense=np.ones(100, np.float32))], 0, 0, "r")
    with pytest.raises(codec.CodecError, match="malformed PushRequest"):
        codec.decode_push(data[:-10])


def test_unsupported_numpy_dtype_is_refused():
    with pytest.raises(codec.CodecError, match="not supported"):
        codec.encode_tensor(np.ones(3, dtype=np.complex64))


def test_big_endian_input_is_sent_little_endian():
    array = np.arange(4, dtype=">i4")
    raw = memoryview(codec.encode_tensor(array))
    assert codec.decode_tensor(raw, (0, len(raw))).tolist() == [0, 1, 2, 3]
