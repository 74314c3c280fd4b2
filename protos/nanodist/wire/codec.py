"""Tensor codec: numpy arrays to nanodist.v1 messages and back, with no pickle.

Decoding never copies tensor data: arrays are np.frombuffer views of the
received message (read-only). Every decode checks dtype, shape and length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from nanodist.v1 import tensor_pb2
from nanodist.wire import framing as wire

MAX_DIMS = 16
# Bytes one tensor may describe: numpy sizes and Tensor.shape are int64, so nothing larger is addressable.
MAX_TENSOR_BYTES = (1 << 63) - 1

_PROTO_TO_NUMPY: dict[int, np.dtype] = {
    tensor_pb2.FLOAT32: np.dtype("<f4"),
    tensor_pb2.FLOAT64: np.dtype("<f8"),
    tensor_pb2.FLOAT16: np.dtype("<f2"),
    tensor_pb2.INT32: np.dtype("<i4"),
    tensor_pb2.INT64: np.dtype("<i8"),
    tensor_pb2.BFLOAT16: np.dtype(ml_dtypes.bfloat16),  # numpy has none; ml_dtypes adds it, arithmetic included
}
_NUMPY_TO_PROTO = {dt: code for code, dt in _PROTO_TO_NUMPY.items()}
FLOAT_DTYPES = (tensor_pb2.FLOAT32, tensor_pb2.FLOAT64, tensor_pb2.FLOAT16, tensor_pb2.BFLOAT16)


class CodecError(ValueError):
    """A message violates the wire format; `str()` names the offending field."""


def proto_dtype(dtype: np.dtype) -> int:
    code = _NUMPY_TO_PROTO.get(np.dtype(dtype).newbyteorder("<"))
    if code is None:
        raise CodecError(
            f"dtype {np.dtype(dtype)} is not supported; use one of {sorted(str(d) for d in _NUMPY_TO_PROTO)}"
        )
    return code


def numpy_dtype(code: int, path: str = "dtype") -> np.dtype:
    dtype = _PROTO_TO_NUMPY.get(code)
    if dtype is None:
        raise CodecError(f"{path}: unknown dtype {code}")
    return dtype


def as_wire_array(array: np.ndarray) -> np.ndarray:
    """The array as contiguous little-endian memory (a no-op for the usual case)."""
    array = np.asarray(array)
    proto_dtype(array.dtype)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    # np.ascontiguousarray would turn a 0-d array into a 1-d one.
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def raw_bytes(array: np.ndarray) -> memoryview:
    """A byte view of a contiguous array, without copying."""
    return array.reshape(-1).view(np.uint8).data


def tensor_parts(array: np.ndarray, shape: tuple[int, ...] | None = None) -> wire.Parts:
    """Tensor fields for `array`; the data is referenced, not copied."""
    array = as_wire_array(array)
    data = raw_bytes(array)
    parts = wire.Parts()
    parts.add(wire.int_field(1, proto_dtype(array.dtype)))
    parts.add(wire.packed_ints(2, array.shape if shape is None else shape))
    if len(data):
        parts.add(wire.tag(3, wire.LEN) + wire.varint(len(data))).add(data)
    return parts


def encode_tensor(array: np.ndarray) -> bytes:
    """A serialized nanodist.v1.Tensor."""
    return tensor_parts(array).join()


def to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    """A generated Tensor message (copies the data: for small, non-hot-path use)."""
    return tensor_pb2.Tensor.FromString(encode_tensor(array))


def check_shape(shape: list[int], path: str, itemsize: int = 1) -> int:
    """Validate a shape and return its element count.

    Sizes are Python ints, which cannot overflow: a shape such as
    [2**40, 2**40] is refused as too large instead of wrapping around int64.
    """
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{path}.shape: {len(shape)} dimensions, at most {MAX_DIMS} allowed")
    if any(d < 0 for d in shape):
        raise CodecError(f"{path}.shape: negative dimension in {shape}")
    # numpy refuses a shape whose nonzero dimensions alone pass the limit even when another one is 0 (an
    # empty [0, 2**31, 2**31] of float32), so those are what is bounded; without a 0 they are the count.
    extent = math.prod(d for d in shape if d)
    if extent * itemsize > MAX_TENSOR_BYTES:
        raise CodecError(
            f"{path}.shape: {shape} is too large: {extent} elements of {itemsize} bytes pass the limit "
            f"of {MAX_TENSOR_BYTES} bytes (2**63 - 1) per tensor"
        )
    return math.prod(shape)


def decode_tensor(buf: memoryview, span: tuple[int, int], path: str = "tensor") -> np.ndarray:
    """View a serialized Tensor inside `buf[span]` as an array (zero copy)."""
    code = 0
    shape: list[int] = []
    data = (span[0], span[0])
    try:
        for f in wire.fields(buf, *span):
            if f.number == 1 and f.wire_type == wire.VARINT:
                code = f.value
            elif f.number == 2:
                wire.read_ints(buf, f, shape)
            elif f.number == 3 and f.wire_type == wire.LEN:
                data = f.span
    except wire.WireError as exc:
        raise CodecError(f"{path}: {exc}") from exc
    dtype = numpy_dtype(code, f"{path}.dtype")
    count = check_shape(shape, path, dtype.itemsize)
    length = data[1] - data[0]
    if length != count * dtype.itemsize:
        raise CodecError(
            f"{path}.data: {length} bytes, but shape {shape} of {dtype.name} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(buf, dtype=dtype, count=count, offset=data[0]).reshape(tuple(shape))


def from_proto(message: tensor_pb2.Tensor, path: str = "tensor") -> np.ndarray:
    """Decode a generated Tensor message (validated)."""
    raw = memoryview(message.SerializeToString())
    return decode_tensor(raw, (0, len(raw)), path)


@dataclass
class Entry:
    """One key's payload in a Push or Pull message: dense, a dense slice, or sparse rows."""

    key: str
    dense: np.ndarray | None = None
    rows: np.ndarray | None = None
    values: np.ndarray | None = None
    offset: int = 0
    version: int = 0
    shape: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the entry carries (the dense tensor, or the sparse rows' values)."""
        return sum(array.nbytes for array in (self.dense, self.values) if array is not None)


def _entry_parts(entry: Entry, dense_field: int, extra: wire.Parts) -> wire.Parts:
    parts = wire.Parts().add(wire.str_field(1, entry.key))
    if entry.rows is not None:
        assert entry.values is not None
        sparse = wire.Parts().add(wire.packed_int_array(1, entry.rows))
        sparse.add_message(2, tensor_parts(entry.values))
        parts.add_message(3, sparse)
    elif entry.dense is not None:
        parts.add_message(dense_field, tensor_parts(entry.dense))
    for piece in extra.items:
        parts.add(piece)
    return parts


@dataclass(frozen=True)
class Membership:
    """An elastic job's generation and how many workers push each step in it (0, 0: not elastic)."""

    generation: int = 0
    pushers: int = 0


NOT_ELASTIC = Membership()


def encode_push(
    entries: list[Entry],
    worker_id: int,
    step: int,
    request_id: str,
    fencing_token: int = 0,
    membership: Membership = NOT_ELASTIC,
) -> bytes:
    """A serialized PushRequest; tensor data is copied exactly once (the join)."""
    return push_parts(entries, worker_id, step, request_id, fencing_token, membership).join()


def push_parts(
    entries: list[Entry],
    worker_id: int,
    step: int,
    request_id: str,
    fencing_token: int = 0,
    membership: Membership = NOT_ELASTIC,
) -> wire.Parts:
    """A PushRequest's pieces, the tensors' memory referenced in place (for a gathered send)."""
    message = wire.Parts()
    for entry in entries:
        message.add_message(1, _entry_parts(entry, 2, wire.Parts().add(wire.int_field(4, entry.offset))))
    message.add(wire.int_field(2, worker_id)).add(wire.int_field(3, step))
    message.add(wire.str_field(4, request_id)).add(wire.int_field(5, fencing_token))
    if membership.generation or membership.pushers:
        message.add(wire.int_field(6, membership.generation)).add(wire.int_field(7, membership.pushers))
    return message


def encode_pull_response(entries: list[Entry], slowest_clock: int = 0) -> bytes:
    """A serialized PullResponse built around the values' memory."""
    return pull_response_parts(entries, slowest_clock).join()


def pull_response_parts(entries: list[Entry], slowest_clock: int = 0) -> wire.Parts:
    """A PullResponse's pieces, the values' memory referenced in place."""
    message = wire.Parts().add(wire.int_field(2, slowest_clock))
    for entry in entries:
        extra = wire.Parts().add(wire.int_field(4, entry.version)).add(wire.int_field(5, entry.offset))
        extra.add(wire.packed_ints(6, entry.shape))
        message.add_message(1, _entry_parts(entry, 2, extra))
    return message


def _decode_sparse(buf: memoryview, span: tuple[int, int], path: str) -> tuple[np.ndarray, np.ndarray]:
    pieces: list[np.ndarray] = []  # a repeated field may come in several pieces
    values: np.ndarray | None = None
    for f in wire.fields(buf, *span):
        if f.number == 1:
            pieces.append(wire.read_int_array(buf, f))
        elif f.number == 2 and f.wire_type == wire.LEN:
            values = decode_tensor(buf, f.span, f"{path}.values")
    if values is None:
        raise CodecError(f"{path}.values: missing")
    rows = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
    if values.ndim != 2 or values.shape[0] != len(rows):
        raise CodecError(f"{path}.values: shape {list(values.shape)} must be [len(rows)={len(rows)}, columns]")
    return rows, values


def _decode_entry(buf: memoryview, span: tuple[int, int], path: str, is_value: bool) -> Entry:
    """Decode a GradientEntry, or a ValueEntry when `is_value` (fields 4 and 5 differ)."""
    entry = Entry(key="")
    for f in wire.fields(buf, *span):
        number, wire_type = f.number, f.wire_type
        if number == 1 and wire_type == wire.LEN:
            entry.key = wire.read_str(buf, f.span)
        elif number == 2 and wire_type == wire.LEN:
            entry.dense = decode_tensor(buf, f.span, f"{path}.dense")
        elif number == 3 and wire_type == wire.LEN:
            entry.rows, entry.values = _decode_sparse(buf, f.span, f"{path}.sparse")
        elif number == 4 and wire_type == wire.VARINT:
            if is_value:
                entry.version = wire.signed64(f.value)
            else:
                entry.offset = wire.signed64(f.value)
        elif number == 5 and wire_type == wire.VARINT and is_value:
            entry.offset = wire.signed64(f.value)
        elif number == 6:
            wire.read_ints(buf, f, entry.shape)
    return entry


@dataclass
class PushMessage:
    entries: list[Entry]
    worker_id: int = 0
    step: int = 0
    request_id: str = ""
    fencing_token: int = 0
    membership: Membership = NOT_ELASTIC


def decode_push(data: bytes | memoryview) -> PushMessage:
    """Parse a PushRequest; gradients are views of `data`. Raises CodecError."""
    buf = memoryview(data)
    message = PushMessage(entries=[])
    try:
        for f in wire.fields(buf):
            number, wire_type = f.number, f.wire_type
            if number == 1 and wire_type == wire.LEN:
                path = f"entries[{len(message.entries)}]"
                message.entries.append(_decode_entry(buf, f.span, path, False))
            elif number == 2 and wire_type == wire.VARINT:
                message.worker_id = wire.signed64(f.value)
            elif number == 3 and wire_type == wire.VARINT:
                message.step = wire.signed64(f.value)
            elif number == 4 and wire_type == wire.LEN:
                message.request_id = wire.read_str(buf, f.span)
            elif number == 5 and wire_type == wire.VARINT:
                message.fencing_token = wire.signed64(f.value)
            elif number == 6 and wire_type == wire.VARINT:
                generation = wire.signed64(f.value)
                message.membership = Membership(generation, message.membership.pushers)
            elif number == 7 and wire_type == wire.VARINT:
                message.membership = Membership(message.membership.generation, wire.signed64(f.value))
    except wire.WireError as exc:
        raise CodecError(f"malformed PushRequest: {exc}") from exc
    return message


def decode_pull_response(data: bytes | memoryview) -> tuple[list[Entry], int]:
    """Parse a PullResponse into (entries, slowest_clock); values are read-only views of `data`."""
    buf = memoryview(data)
    entries: list[Entry] = []
    slowest_clock = 0
    try:
        for f in wire.fields(buf):
            if f.number == 1 and f.wire_type == wire.LEN:
                path = f"entries[{len(entries)}]"
                entries.append(_decode_entry(buf, f.span, path, True))
            elif f.number == 2 and f.wire_type == wire.VARINT:
                slowest_clock = wire.signed64(f.value)
    except wire.WireError as exc:
        raise CodecError(f"malformed PullResponse: {exc}") from exc
    return entries, slowest_clock
