"""Minimal protobuf wire-format reader and writer for the tensor hot path.

The generated classes copy every `bytes` field on parse and serialize. For
tensors of hundreds of megabytes that copy dominates, so Push and Pull frame
their messages by hand: the numpy buffer is joined once into the outgoing
message and viewed in place (np.frombuffer) in the incoming one. The bytes are
ordinary protobuf, so stock decoders in any language read them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

VARINT = 0
FIXED64 = 1
LEN = 2
FIXED32 = 5

_MASK64 = (1 << 64) - 1
_SEVENS = np.arange(10, dtype=np.uint64) * np.uint64(7)


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(value: int) -> bytes:
    """Encode an int as a protobuf varint (negative numbers as 10-byte two's complement)."""
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def int_field(field: int, value: int) -> bytes:
    """A varint field; proto3 omits zero values."""
    return tag(field, VARINT) + varint(value) if value else b""


def bytes_field(field: int, payload: bytes) -> bytes:
    return tag(field, LEN) + varint(len(payload)) + payload if payload else b""


def str_field(field: int, text: str) -> bytes:
    return bytes_field(field, text.encode())


def packed_ints(field: int, values: list[int] | tuple[int, ...]) -> bytes:
    if not values:
        return b""
    return bytes_field(field, b"".join(varint(v) for v in values))


def packed_int_array(field: int, values: np.ndarray) -> bytes:
    """packed_ints for a numpy array of int64, encoded without a Python loop (embedding rows are many)."""
    if not len(values):
        return b""
    unsigned = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    groups = (unsigned[:, None] >> _SEVENS) & np.uint64(0x7F)  # [n, 10]: 7-bit groups, low first
    more = (unsigned[:, None] >> (_SEVENS + np.uint64(7))) != 0  # a later group is not zero
    used = np.concatenate([np.ones((len(unsigned), 1), bool), more[:, :-1]], axis=1)
    encoded = (groups | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)
    return bytes_field(field, encoded[used].tobytes())


def read_int_array(buf: memoryview, field: Field) -> np.ndarray:
    """A repeated int64 field as an array: packed fields are decoded without a Python loop."""
    if field.wire_type != LEN:
        out: list[int] = []
        read_ints(buf, field, out)
        return np.asarray(out, dtype=np.int64)
    data = np.frombuffer(buf[field.span[0] : field.span[1]], dtype=np.uint8)
    if not len(data):
        return np.empty(0, np.int64)
    ends = np.flatnonzero(data < 0x80)
    if not len(ends) or ends[-1] != len(data) - 1:
        raise WireError("truncated varint")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 10:
        raise WireError("varint longer than 10 bytes")
    shifts = (np.arange(len(data)) - np.repeat(starts, lengths)).astype(np.uint64) * np.uint64(7)
    parts = (data & 0x7F).astype(np.uint64) << shifts
    return np.add.reduceat(parts, starts).view(np.int64)


class Parts:
    """Pieces of one message, kept apart so a large buffer is copied only by the final join."""

    __slots__ = ("items", "size")

    def __init__(self) -> None:
        self.items: list[bytes | memoryview] = []
        self.size = 0

    def add(self, piece: bytes | memoryview) -> Parts:
        if piece:
            self.items.append(piece)
            self.size += len(piece)
        return self

    def add_message(self, field: int, inner: Parts) -> Parts:
        """Append `inner` as a length-delimited submessage field."""
        self.add(tag(field, LEN) + varint(inner.size))
        self.items.extend(inner.items)
        self.size += inner.size
        return self

    def join(self) -> bytes:
        return b"".join(self.items)

    def write_into(self, target: memoryview) -> None:
        """Copy the message into the start of `target` (at least `size` bytes)."""
        Parts.write_pieces(self.items, target)

    @staticmethod
    def write_pieces(pieces: Sequence[bytes | memoryview], target: memoryview) -> None:
        at = 0
        for piece in pieces:
            target[at : at + len(piece)] = piece
            at += len(piece)


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint too long")


def signed64(value: int) -> int:
    """Interpret a decoded varint as int64/int32 (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


class Field(NamedTuple):
    """One field of a message, as `fields` reads it."""

    number: int
    wire_type: int
    value: int  # varint and fixed fields: the integer; length-delimited: the payload's length
    span: tuple[int, int]  # length-delimited: the payload's (start, end) in the buffer; else (0, 0)


_NO_SPAN = (0, 0)


def fields(buf: memoryview, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """Yield each field of the message in `buf[start:end]`."""
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(buf, pos, end)
            yield Field(number, wire_type, value, _NO_SPAN)
        elif wire_type == LEN:
            length, pos = read_varint(buf, pos, end)
            if pos + length > end:
                raise WireError(f"field {number} runs past the end of the message")
            yield Field(number, wire_type, length, (pos, pos + length))
            pos += length
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise WireError("truncated fixed64")
            yield Field(number, wire_type, int.from_bytes(buf[pos : pos + 8], "little"), _NO_SPAN)
            pos += 8
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise WireError("truncated fixed32")
            yield Field(number, wire_type, int.from_bytes(buf[pos : pos + 4], "little"), _NO_SPAN)
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")


def read_ints(buf: memoryview, field: Field, out: list[int]) -> None:
    """Append a repeated int64 field's values, packed or not, to `out`."""
    if field.wire_type == VARINT:
        out.append(signed64(field.value))
        return
    if field.wire_type != LEN:
        raise WireError(f"field {field.number}: expected int64 values, got wire type {field.wire_type}")
    pos, end = field.span
    while pos < end:
        item, pos = read_varint(buf, pos, end)
        out.append(signed64(item))


def read_str(buf: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(buf[span[0] : span[1]]).decode()
    except UnicodeDecodeError as exc:
        raise WireError("string field is not valid UTF-8") from exc
