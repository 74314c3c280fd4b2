"""A repeated int64 field sent with a fixed-width wire type is a CodecError, not a crash."""

from __future__ import annotations

import pytest

from nanodist.v1 import tensor_pb2
from nanodist.wire import codec
from nanodist.wire import framing as wire


def test_a_shape_sent_as_fixed64_is_refused_as_malformed() -> None:
    data = wire.int_field(1, tensor_pb2.FLOAT32) + wire.tag(2, wire.FIXED64) + (3).to_bytes(8, "little")
    buf = memoryview(data)
    with pytest.raises(codec.CodecError, match="field 2: expected int64 values, got wire type 1"):
        codec.decode_tensor(buf, (0, len(buf)))


def test_fields_reads_each_wire_type() -> None:
    data = (
        wire.int_field(1, 7)
        + wire.str_field(2, "key")
        + wire.tag(3, wire.FIXED64)
        + (9).to_bytes(8, "little")
        + wire.tag(4, wire.FIXED32)
        + (5).to_bytes(4, "little")
    )
    found = list(wire.fields(memoryview(data)))
    assert [(f.number, f.wire_type, f.value) for f in found] == [(1, 0, 7), (2, 2, 3), (3, 1, 9), (4, 5, 5)]
    assert wire.read_str(memoryview(data), found[1].span) == "key"
