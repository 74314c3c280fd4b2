"""The ParameterServer gRPC service.

Push and Pull bypass the generated classes (see nanodist.wire.framing): their
handlers receive and return raw message bytes so that tensor data is viewed
in place on the way in and copied once on the way out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from nanodist.services.common.boundary import server_stream, unary
from nanodist.services.common.errors import ServiceError, exhausted, invalid
from nanodist.services.common.handlers import safe_parser
from nanodist.services.common.metrics import BYTES, KEY_BYTES, KEYS
from nanodist.services.common.validation import check_count, check_name
from nanodist.services.parameter_server import init_entry
from nanodist.services.parameter_server.durability import Durability, Persistence
from nanodist.services.parameter_server.lane import LaneServer
from nanodist.services.parameter_server.push_assembly import PushAssembly
from nanodist.services.parameter_server.replica_set import ReplicaSet
from nanodist.services.parameter_server.store import Slot, Store
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec
from nanodist.wire.framing import Parts

SERVICE = "nanodist.v1.ParameterServer"
MAX_ENTRIES = 100_000
MAX_REQUEST_ID = 128
MAX_PUSH_STREAMS = 64  # PushStreams assembling at once; each may hold a full-size buffer per key
DEFAULT_PULL_TIMEOUT_MS = 30_000
DEFAULT_CHUNK_BYTES = 16 << 20
log = logging.getLogger("nanodist.ps")


class Changes:
    """Wakes the pulls that wait for the store to change, and answers them UNAVAILABLE on shutdown.

    An Event replaced at every change rather than an asyncio.Condition: a Condition's wait cancelled
    inside asyncio.wait_for (as server shutdown cancels a waiting pull) can leave its lock released and
    fail with "Lock is not acquired". The store runs single-threaded on the loop, so no lock is needed.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closing = False

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """Shutdown begins: every waiting pull answers now, before the server stops taking calls."""
        self.closing = True
        self.notify()

    async def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Return once ready() holds; TimeoutError after `timeout` s; UNAVAILABLE if the shard shuts down."""
        async with asyncio.timeout(timeout):
            while not ready():
                if self.closing:
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE, "the parameter server is shutting down; retry once it is back"
                    )
                await self._event.wait()


class ParameterServerService:
    def __init__(self, store: Store, max_message_bytes: int, persistence: Persistence | None = None) -> None:
        self.store = store
        self.max_message_bytes = max_message_bytes
        self.persistence = persistence or Persistence(store, Durability.NONE, None)
        self.changed = Changes()
        self.assembling = 0
        self.lane: LaneServer | None = None  # the tensor lane, once the shard opens one
        self.replicas: ReplicaSet | None = None  # set when this shard is one replica of a replica set

    def _gate(self) -> None:
        """A backup of a replica set (or a primary whose lease lapsed) serves no client call."""
        if self.replicas is not None:
            self.replicas.check_serving()

    def _replicate(self, init: bytes = b"", push: bytes = b"") -> int:
        """Queue an applied change for the backups, in the loop step that applied it (so in apply order);
        its sequence number. With nothing to send, the last one's: a replayed answer waits for it too."""
        if self.replicas is None:
            return 0
        replicator = self.replicas.replicator
        return replicator.record(init=init, push=push) if init or push else replicator.seq

    async def _acknowledged(self, seq: int) -> None:
        """Until every in-sync backup has change `seq`."""
        if self.replicas is not None:
            await self.replicas.replicator.acknowledged(seq)

    def open_lanes(self, host: str, port: int, tcp: bool) -> None:
        """Serve Push and Pull on the tensor lane too (locally always, over TCP when `tcp`)."""
        self.lane = LaneServer(self.push, self.pull_parts, host, port, tcp, self.max_message_bytes)

    def stopping(self) -> None:
        """Shutdown begins: waiting pulls answer UNAVAILABLE and lane connections close."""
        self.changed.close()
        if self.lane is not None:
            self.lane.close()

    # --- Init -----------------------------------------------------------

    @unary("ps", "Init")
    async def init(self, request: ps.InitRequest, context: grpc.aio.ServicerContext) -> ps.InitResponse:
        self._gate()
        check_count(len(request.entries), "entries", MAX_ENTRIES)
        prepared = []
        names = set()
        for i, entry in enumerate(request.entries):
            path = f"entries[{i}]"
            prepared.append(init_entry.prepare(entry, path))
            if entry.key in names:
                raise invalid(f"{path}.key: {entry.key!r} appears twice in one request")
            names.add(entry.key)
        response = ps.InitResponse()
        for key, value, optimizer in prepared:
            created, version = self.store.init(key, value, optimizer)
            response.results.add(key=key, created=created, version=version)
            if created:
                slot = self.store.slots[key]
                kind = "table" if slot.table else "key"
                log.info("init %s %s %s %s", kind, key, slot.dtype.name, list(slot.shape))
        self.update_gauges()
        created = any(r.created for r in response.results)
        replicated = self._replicate(init=request.SerializeToString() if created else b"")
        durable = self.persistence.log_init(request) if created else None
        await (durable or self.persistence.synced())
        await self._acknowledged(replicated)
        return response

    # --- Push -----------------------------------------------------------

    @unary("ps", "Push")
    async def push(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        BYTES.labels("ps", "in").inc(len(data))
        message = codec.decode_push(data)
        return await self._commit(message, data)

    @unary("ps", "PushStream")
    async def push_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        if self.assembling >= MAX_PUSH_STREAMS:
            raise exhausted(f"{self.assembling} PushStreams are in progress, the limit of this server; retry later")
        assembly = PushAssembly(self.store)
        self.assembling += 1
        try:
            async for data in requests:
                BYTES.labels("ps", "in").inc(len(data))
                message = codec.decode_push(data)
                if assembly.header is None and message.request_id:
                    self._gate()
                    replay = self.store.replay(message.request_id)
                    if replay is not None:
                        await self._acknowledged(self._replicate())
                        return replay
                assembly.add(message)
            return await self._commit(assembly.message(), None)
        finally:
            self.assembling -= 1
            assembly.release()

    async def _commit(self, message: codec.PushMessage, data: bytes | None) -> bytes:
        """Apply a push, log it (wal mode), and answer only once the log is durable."""
        self._gate()
        replay = self.store.replay(message.request_id) if message.request_id else None
        if replay is not None:
            await self.persistence.synced()  # the first attempt's record may still be in flight
            await self._acknowledged(self._replicate())
            return replay
        response = self.apply(message)
        if (self.persistence.log is not None or self.replicas is not None) and data is None:
            data = codec.encode_push(  # an assembled stream: logged and replicated as one push
                message.entries,
                message.worker_id,
                message.step,
                message.request_id,
                message.fencing_token,
                message.membership,
            )
        replicated = self._replicate(push=data or b"")
        durable = self.persistence.log_push(data or b"")
        self.changed.notify()
        if durable is not None:
            await durable
        await self._acknowledged(replicated)
        return response

    def apply(self, message: codec.PushMessage) -> bytes:
        """Validate and apply one push; synchronous, so the log's order is the apply order."""
        if len(message.request_id) > MAX_REQUEST_ID:
            raise invalid(f"request_id: {len(message.request_id)} characters, at most {MAX_REQUEST_ID}")
        if message.request_id:
            replay = self.store.replay(message.request_id)
            if replay is not None:
                return replay
        for i, entry in enumerate(message.entries):
            check_name(entry.key, f"entries[{i}].key")
            if entry.offset:
                raise invalid(f"entries[{i}].offset: only PushStream takes slices")
        result = self.store.push(
            message.entries, message.worker_id, message.step, message.fencing_token, message.membership
        )
        if message.request_id:
            duplicate = ps.PushResponse(versions=result.versions, applied=result.applied, duplicate=True)
            self.store.remember(message.request_id, duplicate.SerializeToString())
        return ps.PushResponse(versions=result.versions, applied=result.applied).SerializeToString()

    # --- Pull -----------------------------------------------------------

    async def _await_ready(self, request: ps.PullRequest, context: grpc.aio.ServicerContext) -> list[Slot]:
        self._gate()
        check_count(len(request.entries), "entries", MAX_ENTRIES)
        if not request.entries:
            raise invalid("entries: a pull needs at least one key")
        slots = []
        for i, entry in enumerate(request.entries):
            check_name(entry.key, f"entries[{i}].key")
            slot = self.store.slot(entry.key, f"entries[{i}].key")
            if slot.table is not None and not entry.rows:
                raise invalid(
                    f"entries[{i}].rows: {entry.key!r} is a table of {slot.shape[0]} rows created as they are "
                    "pushed; pull it by rows"
                )
            slots.append(slot)
        if request.timeout_ms < 0:
            raise invalid(f"timeout_ms: must be >= 0, got {request.timeout_ms}")
        if self.store.ready(slots, request.min_version, request.clock):
            return slots
        timeout = (request.timeout_ms or DEFAULT_PULL_TIMEOUT_MS) / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        try:
            await self.changed.wait_until(lambda: self.store.ready(slots, request.min_version, request.clock), timeout)
        except TimeoutError:
            behind = [
                f"{e.key}@{s.version}"
                for e, s in zip(request.entries, slots, strict=True)
                if s.version < request.min_version
            ]
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"pull waited {timeout:.1f}s: min_version={request.min_version}, behind: "
                f"{behind or 'none'}; slowest worker clock {self.store.slowest_clock()} "
                f"(clock={request.clock}, staleness={self.store.staleness})",
            ) from None
        return slots

    def _value(self, key: str, slot: Slot, rows: list[int], path: str) -> codec.Entry:
        if not rows:
            return codec.Entry(key=key, dense=slot.value, version=slot.version)
        shape = slot.shape
        if len(shape) != 2:
            raise invalid(f"{path}.rows: key {key!r} is not 2-D")
        index = np.asarray(rows, dtype=np.int64)
        if index.min() < 0 or index.max() >= shape[0]:
            raise invalid(f"{path}.rows: indices must be in [0, {shape[0]})")
        values = slot.table.read(index) if slot.table is not None else slot.value[index]
        return codec.Entry(key=key, rows=index, values=values, version=slot.version)

    @unary("ps", "Pull")
    async def pull(self, request: ps.PullRequest, context: grpc.aio.ServicerContext) -> bytes:
        return (await self._pull_parts(request, context)).join()

    @unary("ps", "Pull")
    async def pull_parts(self, request: ps.PullRequest, context: grpc.aio.ServicerContext) -> Parts:
        """Pull for the tensor lane: the answer as pieces viewing the values, which the lane copies out
        before anything else runs on the loop (so no push lands in the middle of it)."""
        return await self._pull_parts(request, context)

    async def _pull_parts(self, request: ps.PullRequest, context: grpc.aio.ServicerContext) -> Parts:
        slots = await self._await_ready(request, context)
        entries = [
            self._value(e.key, s, list(e.rows), f"entries[{i}]")
            for i, (e, s) in enumerate(zip(request.entries, slots, strict=True))
        ]
        size = sum(e.nbytes for e in entries)
        if size > self.max_message_bytes:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"pull of {size} bytes exceeds the message limit of {self.max_message_bytes} bytes; use PullStream",
            )
        parts = codec.pull_response_parts(entries, self.store.slowest_clock())
        BYTES.labels("ps", "out").inc(parts.size)
        return parts

    @server_stream("ps", "PullStream")
    async def pull_stream(self, request: ps.PullRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        slots = await self._await_ready(request, context)
        chunk_bytes = request.chunk_bytes or DEFAULT_CHUNK_BYTES
        if not 1024 <= chunk_bytes <= self.max_message_bytes - 4096:
            raise invalid(f"chunk_bytes: {chunk_bytes} is outside [1024, {self.max_message_bytes - 4096}]")
        for i, (entry, slot) in enumerate(zip(request.entries, slots, strict=True)):
            if entry.rows:
                value = self._value(entry.key, slot, list(entry.rows), f"entries[{i}]")
                data = codec.encode_pull_response([value], self.store.slowest_clock())
                BYTES.labels("ps", "out").inc(len(data))
                yield data
                continue
            flat = slot.value.reshape(-1)
            step = max(1, chunk_bytes // flat.itemsize)
            for start in range(0, max(flat.size, 1), step):
                # Each slice is encoded synchronously, so it is one consistent version;
                # the client checks that all slices of a key carry the same version.
                piece = codec.Entry(
                    key=entry.key,
                    dense=flat[start : start + step],
                    version=slot.version,
                    offset=start,
                    shape=list(slot.value.shape),
                )
                data = codec.encode_pull_response([piece], self.store.slowest_clock())
                BYTES.labels("ps", "out").inc(len(data))
                yield data

    @unary("ps", "OpenLane")
    async def open_lane(self, request: ps.OpenLaneRequest, context: grpc.aio.ServicerContext) -> ps.OpenLaneResponse:
        self._gate()
        if self.replicas is not None:  # its pushes must reach the backups, which the lane does not carry
            raise ServiceError(grpc.StatusCode.UNIMPLEMENTED, "a replica set serves no tensor lane: use Push and Pull")
        if self.lane is None:
            raise ServiceError(
                grpc.StatusCode.UNIMPLEMENTED, "this shard serves no tensor lane (--lanes off): use Push and Pull"
            )
        return self.lane.describe()

    # --- metadata -------------------------------------------------------

    @unary("ps", "ListKeys")
    async def list_keys(self, request: ps.ListKeysRequest, context: grpc.aio.ServicerContext) -> ps.ListKeysResponse:
        self._gate()
        response = ps.ListKeysResponse()
        for key in sorted(self.store.slots):
            slot = self.store.slots[key]
            info = response.keys.add(
                key=key,
                dtype=codec.proto_dtype(slot.dtype),
                shape=slot.shape,
                version=slot.version,
                optimizer=slot.optimizer.config.to_proto(),
            )
            if slot.table is not None:
                info.table.CopyFrom(init_entry.table_proto(slot.table.shape))
                info.rows_held = slot.table.held
        return response

    @unary("ps", "Stats")
    async def stats(self, request: ps.StatsRequest, context: grpc.aio.ServicerContext) -> ps.StatsResponse:
        s = self.store
        clocks = [s.clocks.get(w, 0) for w in range(max(s.clocks, default=-1) + 1)]
        return ps.StatsResponse(
            mode=s.mode.value,
            num_workers=s.num_workers,
            staleness=s.staleness,
            num_keys=len(s.slots),
            total_bytes=s.total_bytes(),
            pushes_applied=s.pushes_applied,
            pushes_deduplicated=s.pushes_deduplicated,
            worker_clocks=clocks,
            durability=self.persistence.mode.value,
            wal_records=self.persistence.log.records if self.persistence.log else 0,
            wal_fsyncs=self.persistence.log.fsyncs if self.persistence.log else 0,
            replicas=self.replicas.status() if self.replicas is not None else None,
        )

    @server_stream("ps", "Follow")
    async def follow(
        self, requests: AsyncIterator[ps.FollowRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ps.FollowRecord]:
        if self.replicas is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this shard is no replica set (--replica-set)")
        async for record in self.replicas.replicator.follow(requests, context):
            yield record

    def update_gauges(self) -> None:
        KEYS.set(len(self.store.slots))
        KEY_BYTES.set(self.store.total_bytes())

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def unary_handler(
            handler: Callable[..., Awaitable[Any]],
            request_type: type[Message] | None = None,
            response_type: type[Message] | None = None,
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                handler,
                request_deserializer=safe_parser(request_type) if request_type else None,
                response_serializer=response_type.SerializeToString if response_type else None,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Init": unary_handler(self.init, ps.InitRequest, ps.InitResponse),
                "Push": unary_handler(self.push),
                "PushStream": grpc.stream_unary_rpc_method_handler(self.push_stream),
                "Pull": unary_handler(self.pull, ps.PullRequest),
                "PullStream": grpc.unary_stream_rpc_method_handler(
                    self.pull_stream, request_deserializer=safe_parser(ps.PullRequest)
                ),
                "ListKeys": unary_handler(self.list_keys, ps.ListKeysRequest, ps.ListKeysResponse),
                "Stats": unary_handler(self.stats, ps.StatsRequest, ps.StatsResponse),
                "OpenLane": unary_handler(self.open_lane, ps.OpenLaneRequest, ps.OpenLaneResponse),
                "Follow": grpc.stream_stream_rpc_method_handler(
                    self.follow,
                    request_deserializer=safe_parser(ps.FollowRequest),
                    response_serializer=ps.FollowRecord.SerializeToString,
                ),
            },
        )
