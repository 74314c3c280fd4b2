"""The ParameterServer gRPC service.

Push and Pull bypass the generated classes (see nanodist.client.wire): their
handlers receive and return raw message bytes so that tensor data is viewed
in place on the way in and copied once on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from nanodist.services.common import config as common_config
from nanodist.services.common.errors import ServiceError, exhausted, invalid
from nanodist.services.common.handlers import safe_parser
from nanodist.services.common.metrics import BYTES, KEY_BYTES, KEYS, rpc, rpc_stream
from nanodist.services.common.runtime import serve
from nanodist.services.common.validation import check_count, check_name
from nanodist.services.parameter_server.durability import Durability, Persistence
from nanodist.services.parameter_server.optimizers import OptimizerConfig
from nanodist.services.parameter_server.store import Limits, Mode, Slot, Store
from nanodist.settings import env_default, env_optional
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec

SERVICE = "nanodist.v1.ParameterServer"
MAX_ENTRIES = 100_000
MAX_REQUEST_ID = 128
MAX_PUSH_STREAMS = 64  # PushStreams assembling at once; each may hold a full-size buffer per key
DEFAULT_PULL_TIMEOUT_MS = 30_000
DEFAULT_CHUNK_BYTES = 16 << 20
log = logging.getLogger("nanodist.ps")


class ParameterServerService:
    def __init__(self, store: Store, max_message_bytes: int, persistence: Persistence | None = None) -> None:
        self.store = store
        self.max_message_bytes = max_message_bytes
        self.persistence = persistence or Persistence(store, Durability.NONE, None)
        self.changed = asyncio.Condition()
        self.assembling = 0

    # --- Init -----------------------------------------------------------

    @rpc("ps", "Init")
    async def init(self, request: ps.InitRequest, context: grpc.aio.ServicerContext) -> ps.InitResponse:
        check_count(len(request.entries), "entries", MAX_ENTRIES)
        prepared = []
        names = set()
        for i, entry in enumerate(request.entries):
            path = f"entries[{i}]"
            check_name(entry.key, f"{path}.key")
            if entry.key in names:
                raise invalid(f"{path}.key: {entry.key!r} appears twice in one request")
            names.add(entry.key)
            if not entry.HasField("value"):
                raise invalid(f"{path}.value: missing")
            value = codec.from_proto(entry.value, f"{path}.value")
            if value.dtype.kind != "f":
                raise invalid(f"{path}.value.dtype: parameters must be floating point, got {value.dtype.name}")
            prepared.append((entry.key, value, OptimizerConfig.from_proto(entry.optimizer, f"{path}.optimizer")))
        response = ps.InitResponse()
        for key, value, optimizer in prepared:
            created, version = self.store.init(key, value, optimizer)
            response.results.add(key=key, created=created, version=version)
            if created:
                log.info("init %s %s %s", key, value.dtype.name, list(value.shape))
        self.update_gauges()
        durable = self.persistence.log_init(request) if any(r.created for r in response.results) else None
        await (durable or self.persistence.synced())
        return response

    # --- Push -----------------------------------------------------------

    @rpc("ps", "Push")
    async def push(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        BYTES.labels("ps", "in").inc(len(data))
        message = codec.decode_push(data)
        return await self._commit(message, data)

    @rpc("ps", "PushStream")
    async def push_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        if self.assembling >= MAX_PUSH_STREAMS:
            raise exhausted(f"{self.assembling} PushStreams are in progress, the limit of this server; retry later")
        dense: dict[str, tuple[np.ndarray, int, Slot]] = {}
        self.assembling += 1
        try:
            return await self._assemble_stream(requests, dense)
        finally:
            self.assembling -= 1
            # The store copies or applies gradients before returning, so the buffers are free again.
            for buffer, _, slot in dense.values():
                if len(slot.spare) < 2 and buffer.size == slot.value.size:
                    slot.spare.append(buffer)

    async def _assemble_stream(
        self, requests: AsyncIterator[bytes], dense: dict[str, tuple[np.ndarray, int, Slot]]
    ) -> bytes:
        header: codec.PushMessage | None = None
        sparse: list[codec.Entry] = []
        async for data in requests:
            BYTES.labels("ps", "in").inc(len(data))
            message = codec.decode_push(data)
            if header is None:
                header = message
                replay = self.store.replay(message.request_id) if message.request_id else None
                if replay is not None:
                    return replay
            for entry in message.entries:
                if entry.rows is not None:
                    sparse.append(entry)
                else:
                    self._assemble(entry, dense)
        if header is None:
            raise invalid("PushStream: the stream carried no messages")
        entries = list(sparse)
        for key, (buffer, filled, slot) in dense.items():
            if filled != buffer.size:
                raise invalid(f"PushStream: key {key!r} got {filled} of {buffer.size} elements")
            entries.append(codec.Entry(key=key, dense=buffer.reshape(slot.value.shape)))
        header.entries = entries
        return await self._commit(header, None)

    def _assemble(self, entry: codec.Entry, dense: dict[str, tuple[np.ndarray, int, Slot]]) -> None:
        """Copy one streamed slice into the key's assembly buffer; slices must arrive in order."""
        check_name(entry.key, "entries.key")
        if entry.dense is None:
            raise invalid(f"PushStream: entry for {entry.key!r} has no gradient")
        buffer, filled, slot = dense.get(entry.key) or (
            None,
            0,
            self.store.slot(entry.key, "entries.key"),
        )
        if buffer is None:
            buffer = slot.spare.pop() if slot.spare else np.empty(slot.value.size, dtype=slot.value.dtype)
        piece = entry.dense.reshape(-1)
        if piece.dtype != buffer.dtype:
            raise invalid(
                f"PushStream: {entry.key!r} slice dtype {piece.dtype.name} differs from the key's {buffer.dtype.name}"
            )
        if entry.offset != filled or filled + piece.size > buffer.size:
            raise invalid(
                f"PushStream: {entry.key!r} slice at offset {entry.offset} with "
                f"{piece.size} elements does not continue at {filled} of {buffer.size}"
            )
        buffer[filled : filled + piece.size] = piece
        dense[entry.key] = (buffer, filled + piece.size, slot)

    async def _commit(self, message: codec.PushMessage, data: bytes | None) -> bytes:
        """Apply a push, log it (wal mode), and answer only once the log is durable."""
        replay = self.store.replay(message.request_id) if message.request_id else None
        if replay is not None:
            await self.persistence.synced()  # the first attempt's record may still be in flight
            return replay
        response = self.apply(message)
        if self.persistence.log is not None and data is None:  # an assembled stream: log it as one push
            data = codec.encode_push(
                message.entries, message.worker_id, message.step, message.request_id, message.fencing_token
            )
        durable = self.persistence.log_push(data or b"")
        async with self.changed:
            self.changed.notify_all()
        if durable is not None:
            await durable
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
        result = self.store.push(message.entries, message.worker_id, message.step, message.fencing_token)
        if message.request_id:
            duplicate = ps.PushResponse(versions=result.versions, applied=result.applied, duplicate=True)
            self.store.remember(message.request_id, duplicate.SerializeToString())
        return ps.PushResponse(versions=result.versions, applied=result.applied).SerializeToString()

    # --- Pull -----------------------------------------------------------

    async def _await_ready(self, request: ps.PullRequest, context: grpc.aio.ServicerContext) -> list[Slot]:
        check_count(len(request.entries), "entries", MAX_ENTRIES)
        if not request.entries:
            raise invalid("entries: a pull needs at least one key")
        slots = []
        for i, entry in enumerate(request.entries):
            check_name(entry.key, f"entries[{i}].key")
            slots.append(self.store.slot(entry.key, f"entries[{i}].key"))
        if request.timeout_ms < 0:
            raise invalid(f"timeout_ms: must be >= 0, got {request.timeout_ms}")
        if self.store.ready(slots, request.min_version, request.clock):
            return slots
        timeout = (request.timeout_ms or DEFAULT_PULL_TIMEOUT_MS) / 1000
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        try:
            async with self.changed:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.store.ready(slots, request.min_version, request.clock)),
                    timeout,
                )
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
        if slot.value.ndim != 2:
            raise invalid(f"{path}.rows: key {key!r} is not 2-D")
        index = np.asarray(rows, dtype=np.int64)
        if index.min() < 0 or index.max() >= slot.value.shape[0]:
            raise invalid(f"{path}.rows: indices must be in [0, {slot.value.shape[0]})")
        return codec.Entry(key=key, rows=index, values=slot.value[index], version=slot.version)

    @rpc("ps", "Pull")
    async def pull(self, request: ps.PullRequest, context: grpc.aio.ServicerContext) -> bytes:
        slots = await self._await_ready(request, context)
        entries = [
            self._value(e.key, s, list(e.rows), f"entries[{i}]")
            for i, (e, s) in enumerate(zip(request.entries, slots, strict=True))
        ]
        size = sum(e.dense.nbytes if e.dense is not None else e.values.nbytes for e in entries)  # type: ignore[union-attr]
        if size > self.max_message_bytes:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"pull of {size} bytes exceeds the message limit of {self.max_message_bytes} bytes; use PullStream",
            )
        data = codec.encode_pull_response(entries, self.store.slowest_clock())
        BYTES.labels("ps", "out").inc(len(data))
        return data

    @rpc_stream("ps", "PullStream")
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

    # --- metadata -------------------------------------------------------

    @rpc("ps", "ListKeys")
    async def list_keys(self, request: ps.ListKeysRequest, context: grpc.aio.ServicerContext) -> ps.ListKeysResponse:
        response = ps.ListKeysResponse()
        for key in sorted(self.store.slots):
            slot = self.store.slots[key]
            response.keys.add(
                key=key,
                dtype=codec.proto_dtype(slot.value.dtype),
                shape=slot.value.shape,
                version=slot.version,
                optimizer=slot.optimizer.config.to_proto(),
            )
        return response

    @rpc("ps", "Stats")
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
        )

    def update_gauges(self) -> None:
        KEYS.set(len(self.store.slots))
        KEY_BYTES.set(self.store.total_bytes())

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def unary(handler, request_type=None, response_type=None):  # type: ignore[no-untyped-def]
            return grpc.unary_unary_rpc_method_handler(
                handler,
                request_deserializer=safe_parser(request_type) if request_type else None,
                response_serializer=response_type.SerializeToString if response_type else None,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Init": unary(self.init, ps.InitRequest, ps.InitResponse),
                "Push": unary(self.push),
                "PushStream": grpc.stream_unary_rpc_method_handler(self.push_stream),
                "Pull": unary(self.pull, ps.PullRequest),
                "PullStream": grpc.unary_stream_rpc_method_handler(
                    self.pull_stream, request_deserializer=safe_parser(ps.PullRequest)
                ),
                "ListKeys": unary(self.list_keys, ps.ListKeysRequest, ps.ListKeysResponse),
                "Stats": unary(self.stats, ps.StatsRequest, ps.StatsResponse),
            },
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = env_default
    common_config.add_server_flags(parser, default_port=50051)
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=env("mode", "asp"),
        help="consistency: bsp, asp or ssp (default asp; env NANODIST_MODE)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=env("num_workers", 1),
        help="pushes per step under BSP, and workers tracked by SSP",
    )
    parser.add_argument(
        "--staleness",
        type=int,
        default=env("staleness", 0),
        help="SSP bound s: a pull at clock c waits for every worker to reach c - s",
    )
    parser.add_argument(
        "--dedup-window",
        type=int,
        default=env("dedup_window", 65536),
        help="how many recent request_ids are remembered for exactly-once pushes",
    )
    parser.add_argument(
        "--max-keys",
        type=int,
        default=env("max_keys", Limits.max_keys),
        help=f"most keys this shard holds (default {Limits.max_keys}); Init past it is RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=env("max_bytes", Limits.max_bytes),
        help=f"most bytes of values and optimizer state this shard holds (default {Limits.max_bytes >> 30} GiB)",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="apply gradients holding NaN or Inf instead of refusing them with INVALID_ARGUMENT",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=env_optional("checkpoint_dir"),
        help="restore from and checkpoint into this directory (env NANODIST_CHECKPOINT_DIR)",
    )
    parser.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=env_optional("durability"),
        help="none, checkpoint or wal (default: checkpoint with --checkpoint-dir, else none); "
        "wal fsyncs every push before its ack (env NANODIST_DURABILITY)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=float,
        default=env("checkpoint_interval", 300.0),
        help="seconds between checkpoints when something changed (a final one is written on SIGTERM)",
    )
    parser.add_argument(
        "--max-log-bytes",
        type=int,
        default=env("max_log_bytes", 1 << 30),
        help="wal: checkpoint once the log has grown by this much, so that it can start over (default 1 GiB)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=env("checkpoint_every", 0),
        help="also checkpoint after this many applied pushes (default 0: off)",
    )


def run(args: argparse.Namespace) -> None:
    if args.num_workers < 1:
        raise SystemExit("--num-workers must be >= 1")
    if args.staleness < 0:
        raise SystemExit("--staleness must be >= 0")
    config = common_config.server_config(args)
    durability = Durability(args.durability or ("checkpoint" if args.checkpoint_dir else "none"))

    async def main() -> None:
        limits = Limits(args.max_keys, args.max_bytes, reject_nonfinite=not args.allow_nonfinite)
        store = Store(Mode(args.mode), args.num_workers, args.staleness, args.dedup_window, limits)
        persistence = Persistence(
            store,
            durability,
            args.checkpoint_dir,
            args.checkpoint_interval,
            args.checkpoint_every,
            args.max_log_bytes,
        )
        service = ParameterServerService(store, config.max_message_bytes, persistence)
        await persistence.start(service.apply)
        service.update_gauges()

        def register(server: grpc.aio.Server) -> list[str]:
            server.add_generic_rpc_handlers((service.generic_handler(),))
            return [SERVICE]

        await serve(
            f"parameter server ({args.mode}, durability {durability.value})", config, register, persistence.close
        )

    asyncio.run(main())
