"""One parameter-server shard's channel and methods, and the streamed halves of push and pull.

Push and Pull skip protobuf on the client: requests are encoded and responses
decoded by nanodist.wire.codec straight from and into numpy memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, TypeVar

import grpc
import numpy as np

from nanodist.client.errors import Aborted
from nanodist.client.lane import LaneLink
from nanodist.client.replicas import ReplicaChannel
from nanodist.client.rpc import ClientSecurity, open_channel
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec

SERVICE = "/nanodist.v1.ParameterServer/"
T_co = TypeVar("T_co", covariant=True)
Pulled = tuple[list[codec.Entry], int]  # entries and the slowest worker clock


class Pending(Protocol[T_co]):
    """A call in flight (a grpc future, or a stream to drain): `result()` waits for it."""

    def result(self) -> T_co: ...


class Shard:
    def __init__(
        self, address: str, max_message_bytes: int, security: ClientSecurity | None, lanes: str = "on"
    ) -> None:
        self.address = address
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        replicas = address.split("+")  # a replica set: its replicas, the primary found by trying them
        self.channel = (
            ReplicaChannel(replicas, lambda one: open_channel(one, options, security))
            if len(replicas) > 1
            else open_channel(address, options, security)
        )
        channel = self.channel
        self.init = channel.unary_unary(
            SERVICE + "Init",
            request_serializer=ps.InitRequest.SerializeToString,
            response_deserializer=ps.InitResponse.FromString,
        )
        # Push and Pull carry bytes that nanodist.wire.codec encoded or will decode.
        self.push: grpc.UnaryUnaryMultiCallable[bytes, ps.PushResponse] = channel.unary_unary(
            SERVICE + "Push", response_deserializer=ps.PushResponse.FromString
        )
        self.push_stream: grpc.StreamUnaryMultiCallable[bytes, ps.PushResponse] = channel.stream_unary(
            SERVICE + "PushStream", response_deserializer=ps.PushResponse.FromString
        )
        self.pull: grpc.UnaryUnaryMultiCallable[ps.PullRequest, bytes] = channel.unary_unary(
            SERVICE + "Pull", request_serializer=ps.PullRequest.SerializeToString
        )
        self.pull_stream: grpc.UnaryStreamMultiCallable[ps.PullRequest, bytes] = channel.unary_stream(
            SERVICE + "PullStream", request_serializer=ps.PullRequest.SerializeToString
        )
        self.list_keys = channel.unary_unary(
            SERVICE + "ListKeys",
            request_serializer=ps.ListKeysRequest.SerializeToString,
            response_deserializer=ps.ListKeysResponse.FromString,
        )
        self.stats = channel.unary_unary(
            SERVICE + "Stats",
            request_serializer=ps.StatsRequest.SerializeToString,
            response_deserializer=ps.StatsResponse.FromString,
        )
        open_lane = channel.unary_unary(
            SERVICE + "OpenLane",
            request_serializer=ps.OpenLaneRequest.SerializeToString,
            response_deserializer=ps.OpenLaneResponse.FromString,
        )
        self.lanes = LaneLink(address, open_lane, "off" if len(replicas) > 1 else lanes)

    def close(self) -> None:
        self.lanes.close()
        self.channel.close()


def push_chunks(
    entries: list[codec.Entry],
    chunk_bytes: int,
    worker_id: int,
    step: int,
    request_id: str,
    token: int,
    membership: codec.Membership = codec.NOT_ELASTIC,
) -> Iterator[bytes]:
    """PushStream messages: dense entries sliced to `chunk_bytes`, each slice naming its offset."""
    for entry in entries:
        if entry.dense is None:
            yield codec.encode_push([entry], worker_id, step, request_id, token, membership)
            continue
        flat = entry.dense.reshape(-1)
        per_chunk = max(1, chunk_bytes // flat.itemsize)
        for start in range(0, max(flat.size, 1), per_chunk):
            piece = codec.Entry(key=entry.key, dense=flat[start : start + per_chunk], offset=start)
            yield codec.encode_push([piece], worker_id, step, request_id, token, membership)


class UnaryPull:
    """A Pull in flight; its result is the decoded response."""

    def __init__(self, future: grpc.Future[bytes]) -> None:
        self.future = future

    def result(self) -> Pulled:
        return codec.decode_pull_response(self.future.result())


class StreamedPull:
    """A PullStream, drained by `result()`: slices are reassembled per key.

    A key whose slices carry different versions (an update landed mid-stream)
    raises Aborted, so that the caller can pull again.
    """

    def __init__(self, responses: Iterator[bytes], targets: Mapping[str, np.ndarray] | None = None) -> None:
        self.responses = responses
        self.targets = targets or {}  # keys to assemble straight into the caller's memory

    def result(self) -> Pulled:
        out: dict[str, codec.Entry] = {}
        buffers: dict[str, np.ndarray] = {}
        slowest = 0
        for data in self.responses:
            pieces, slowest = codec.decode_pull_response(data)
            for piece in pieces:
                if piece.dense is None or not piece.shape:
                    out[piece.key] = piece
                    continue
                buffer = buffers.get(piece.key)
                if buffer is None:
                    target = self.targets.get(piece.key)
                    if target is not None and target.shape == tuple(piece.shape) and target.dtype == piece.dense.dtype:
                        buffer = buffers[piece.key] = target.reshape(-1)
                    else:
                        buffer = buffers[piece.key] = np.empty(int(np.prod(piece.shape)), dtype=piece.dense.dtype)
                    out[piece.key] = codec.Entry(
                        key=piece.key, dense=buffer.reshape(piece.shape), version=piece.version
                    )
                elif out[piece.key].version != piece.version:
                    raise Aborted(
                        f"{piece.key!r} changed during a streamed pull "
                        f"(versions {out[piece.key].version} and {piece.version}); pull again"
                    )
                buffer[piece.offset : piece.offset + piece.dense.size] = piece.dense.reshape(-1)
        return list(out.values()), slowest
