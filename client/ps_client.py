"""ParameterServerClient: init, push, pull and push_pull of numpy dicts across shards."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from nanodist.client.errors import NanodistError, from_rpc_error
from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import ClientSecurity, open_channel
from nanodist.client.sharding import parse_part, part_name, row_ranges, shard_of
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec

SERVICE = "/nanodist.v1.ParameterServer/"
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


@dataclass(frozen=True)
class SparseGradient:
    """Gradient rows of a 2-D key: values[i] belongs to row rows[i]."""

    rows: np.ndarray
    values: np.ndarray


def sgd(learning_rate: float) -> ps.Optimizer:
    return ps.Optimizer(kind=ps.Optimizer.SGD, learning_rate=learning_rate)


def momentum(learning_rate: float, momentum: float = 0.9) -> ps.Optimizer:
    return ps.Optimizer(kind=ps.Optimizer.MOMENTUM, learning_rate=learning_rate, momentum=momentum)


def adam(learning_rate: float, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8) -> ps.Optimizer:
    return ps.Optimizer(
        kind=ps.Optimizer.ADAM,
        learning_rate=learning_rate,
        beta1=beta1,
        beta2=beta2,
        epsilon=epsilon,
    )


def adagrad(learning_rate: float, epsilon: float = 1e-10) -> ps.Optimizer:
    return ps.Optimizer(kind=ps.Optimizer.ADAGRAD, learning_rate=learning_rate, epsilon=epsilon)


class Values(dict[str, np.ndarray]):
    """Pulled values by key (read-only views of the received message), with their versions.

    `slowest_clock` is the lowest worker clock the shards reported (SSP/BSP bookkeeping).
    """

    versions: dict[str, int]
    slowest_clock: int = 0


class _Shard:
    def __init__(self, address: str, max_message_bytes: int, security: ClientSecurity | None) -> None:
        self.address = address
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self.channel = open_channel(address, options, security)
        self.init = self.channel.unary_unary(
            SERVICE + "Init",
            request_serializer=ps.InitRequest.SerializeToString,
            response_deserializer=ps.InitResponse.FromString,
        )
        self.push = self.channel.unary_unary(
            SERVICE + "Push",
            request_serializer=None,
            response_deserializer=ps.PushResponse.FromString,
        )
        self.push_stream = self.channel.stream_unary(
            SERVICE + "PushStream",
            request_serializer=None,
            response_deserializer=ps.PushResponse.FromString,
        )
        self.pull = self.channel.unary_unary(
            SERVICE + "Pull",
            request_serializer=ps.PullRequest.SerializeToString,
            response_deserializer=None,
        )
        self.pull_stream = self.channel.unary_stream(
            SERVICE + "PullStream", request_serializer=ps.PullRequest.SerializeToString
        )
        self.list_keys = self.channel.unary_unary(
            SERVICE + "ListKeys",
            request_serializer=ps.ListKeysRequest.SerializeToString,
            response_deserializer=ps.ListKeysResponse.FromString,
        )
        self.stats = self.channel.unary_unary(
            SERVICE + "Stats",
            request_serializer=ps.StatsRequest.SerializeToString,
            response_deserializer=ps.StatsResponse.FromString,
        )


class ParameterServerClient:
    """A client of one or more parameter-server shards.

    Keys are placed with `shard_of` (CRC-32 modulo shard count); calls to
    different shards run in parallel. UNAVAILABLE is retried with backoff, and
    a retried push reuses its request_id so the server applies it once.
    Payloads above `chunk_bytes` go through the streaming RPCs in slices of
    that size: on these machines gRPC moves 2 MiB messages several times faster
    per byte than 64 MiB ones (see bench/ps_throughput.py).

    A key of at least `split_bytes` with at least one row per shard is split
    by rows across all shards when it is created (see nanodist.client.sharding
    for the rule); push and pull then reach every shard in parallel and the
    caller still sees one array. Other clients find the parts with ListKeys.
    """

    def __init__(
        self,
        addresses: Iterable[str] | str,
        *,
        worker_id: int = 0,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = 2 << 20,
        split_bytes: int = 16 << 20,
        security: ClientSecurity | None = None,
    ) -> None:
        addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not addresses:
            raise ValueError("ParameterServerClient needs at least one shard address")
        self.shards = [_Shard(a, max_message_bytes, security) for a in addresses]
        self.worker_id = worker_id
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.chunk_bytes = min(chunk_bytes, max_message_bytes // 2)
        self._nbytes: dict[str, int] = {}  # value sizes seen, to route large pulls to PullStream
        self.split_bytes = split_bytes
        self._parts: dict[str, list[tuple[str, int, int]]] = {}  # split key -> (part key, first row, end row)
        self._split_shapes: dict[str, tuple[int, ...]] = {}
        self._split_dtypes: dict[str, np.dtype] = {}

    def close(self) -> None:
        for shard in self.shards:
            shard.channel.close()

    def __enter__(self) -> ParameterServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shard_index(self, key: str) -> int:
        part = parse_part(key)
        if part is not None and part[2] == len(self.shards):
            return part[1]  # part i of a split key lives on shard i
        return shard_of(key, len(self.shards))

    # --- keys split by rows across shards --------------------------------

    def _split(self, key: str, value: np.ndarray) -> None:
        n = len(self.shards)
        if n < 2 or not self.split_bytes or value.nbytes < self.split_bytes or value.ndim == 0 or len(value) < n:
            return
        self._parts[key] = [(part_name(key, i, n), a, b) for i, (a, b) in enumerate(row_ranges(len(value), n))]
        self._split_shapes[key] = value.shape
        self._split_dtypes[key] = codec.as_wire_array(value).dtype

    def _expand(self, key: str, value: np.ndarray | SparseGradient) -> list[tuple[str, np.ndarray | SparseGradient]]:
        """The (key, value) pairs that go on the wire: the key itself, or its parts' rows."""
        parts = self._parts.get(key)
        if parts is None:
            return [(key, value)]
        if isinstance(value, SparseGradient):
            rows = np.asarray(value.rows, dtype=np.int64)
            out: list[tuple[str, np.ndarray | SparseGradient]] = []
            for part, a, b in parts:
                mask = (rows >= a) & (rows < b)
                if mask.any():
                    out.append((part, SparseGradient(rows[mask] - a, value.values[mask])))
            return out
        array = np.asarray(value)
        if array.shape != self._split_shapes[key]:
            raise ValueError(f"{key!r} has shape {self._split_shapes[key]}, got {array.shape}")
        return [(part, array[a:b]) for part, a, b in parts]

    def _discover(self, keys: Iterable[str]) -> None:
        """Learn sizes and splits of keys this client has not seen (one ListKeys per shard)."""
        if any(k not in self._nbytes and k not in self._parts for k in keys):
            self._learn_sizes()

    def _by_shard(self, keys: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.shard_index(key), []).append(key)
        return groups

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every shard's channel is connected, or raise Unavailable."""
        for shard in self.shards:
            try:
                grpc.channel_ready_future(shard.channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise NanodistError(
                    f"parameter server {shard.address} unreachable after {timeout}s",
                    grpc.StatusCode.UNAVAILABLE,
                ) from None

    def _fan_out(self, calls: dict[int, object], start: object) -> dict[int, object]:
        """Start one call per shard at once, then collect; UNAVAILABLE shards are retried."""
        futures = {i: start(i, request) for i, request in calls.items()}  # type: ignore[operator]
        results = {}
        for i, future in futures.items():
            shard = self.shards[i]
            try:
                results[i] = future.result()  # type: ignore[attr-defined]
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise from_rpc_error(error, shard.address) from None
                try:
                    results[i] = self.retry.call(lambda i=i: start(i, calls[i]).result())  # type: ignore[operator]
                except grpc.RpcError as again:
                    raise from_rpc_error(again, shard.address) from None
        return results

    # --- API ------------------------------------------------------------

    def init(
        self,
        params: Mapping[str, np.ndarray],
        optimizer: ps.Optimizer | Mapping[str, ps.Optimizer] | None = None,
    ) -> dict[str, bool]:
        """Create keys (first writer wins). Returns, per key, whether this call created it."""
        requests: dict[int, ps.InitRequest] = {}
        owner: dict[str, str] = {}
        if len(self.shards) > 1:
            self._discover(params)  # a key that exists keeps its layout, split or whole
        for key, value in params.items():
            opt = optimizer.get(key) if isinstance(optimizer, Mapping) else optimizer
            if key not in self._nbytes and key not in self._parts:
                self._split(key, np.asarray(value))
            for name, piece in self._expand(key, np.asarray(value)):
                requests.setdefault(self.shard_index(name), ps.InitRequest()).entries.add(
                    key=name, value=codec.to_proto(piece), optimizer=opt or sgd(0.01)
                )
                self._nbytes[name] = piece.nbytes  # type: ignore[union-attr]
                owner[name] = key
        results = self._fan_out(requests, lambda i, r: self.shards[i].init.future(r, timeout=self.timeout))
        created: dict[str, bool] = {}
        for response in results.values():
            for r in response.results:  # type: ignore[attr-defined]
                created[owner[r.key]] = created.get(owner[r.key], False) or r.created
        return created

    def push(
        self,
        grads: Mapping[str, np.ndarray | SparseGradient],
        *,
        step: int = 0,
        request_id: str | None = None,
        fencing_token: int = 0,
    ) -> dict[str, int]:
        """Push gradients; returns each key's version after the push.

        The request_id (one per shard, derived from `request_id` if given) is
        reused by retries, so a push is applied exactly once.
        """
        base = request_id or uuid.uuid4().hex
        payloads: dict[int, list[codec.Entry]] = {}
        if self._parts or len(self.shards) > 1:
            self._discover(grads)
        owner: dict[str, str] = {}
        for key, grad in grads.items():
            for name, piece in self._expand(key, grad):
                owner[name] = key
                if isinstance(piece, SparseGradient):
                    rows = np.asarray(piece.rows, dtype=np.int64)
                    entry = codec.Entry(key=name, rows=rows, values=piece.values)
                else:
                    entry = codec.Entry(key=name, dense=codec.as_wire_array(piece))
                payloads.setdefault(self.shard_index(name), []).append(entry)
        order = {i: [e.key for e in entries] for i, entries in payloads.items()}

        def start(i: int, entries: list[codec.Entry]) -> object:
            rid = f"{base}/{i}"
            size = sum((e.dense if e.dense is not None else e.values).nbytes for e in entries)  # type: ignore[union-attr]
            if size > self.chunk_bytes:
                return self.shards[i].push_stream.future(
                    self._push_chunks(entries, step, rid, fencing_token), timeout=self.timeout
                )
            data = codec.encode_push(entries, self.worker_id, step, rid, fencing_token)
            return self.shards[i].push.future(data, timeout=self.timeout)

        results = self._fan_out(payloads, start)
        versions: dict[str, int] = {}
        for i, response in results.items():
            for name, version in zip(order[i], response.versions, strict=True):  # type: ignore[attr-defined]
                key = owner[name]
                versions[key] = min(versions.get(key, version), version)  # a split key: its slowest part
        return versions

    def _push_chunks(self, entries: list[codec.Entry], step: int, request_id: str, token: int) -> Iterator[bytes]:
        for entry in entries:
            if entry.dense is None:
                yield codec.encode_push([entry], self.worker_id, step, request_id, token)
                continue
            flat = entry.dense.reshape(-1)
            per_chunk = max(1, self.chunk_bytes // flat.itemsize)
            for start in range(0, max(flat.size, 1), per_chunk):
                piece = codec.Entry(key=entry.key, dense=flat[start : start + per_chunk], offset=start)
                yield codec.encode_push([piece], self.worker_id, step, request_id, token)

    def pull(
        self,
        keys: Iterable[str],
        *,
        min_version: int = 0,
        clock: int = 0,
        rows: Mapping[str, np.ndarray] | None = None,
        timeout_ms: int = 0,
    ) -> Values:
        """Pull values (read-only arrays) and their versions.

        min_version (BSP) and clock (SSP) make the server wait, up to
        timeout_ms, until the values are fresh enough. `rows` selects rows of
        2-D keys; those come back as arrays of shape [len(rows), columns].
        """
        keys = list(keys)
        rows = rows or {}
        self._discover(k for k in keys if k not in rows)
        wire_keys: list[str] = []
        wholes: dict[str, np.ndarray] = {}  # split keys, assembled in place by the streamed parts
        targets: dict[str, np.ndarray] = {}
        for key in keys:
            parts = self._parts.get(key)
            if parts is None:
                wire_keys.append(key)
                continue
            if key in rows:
                raise ValueError(f"{key!r} is split across shards; pull it whole, not by rows")
            whole = wholes[key] = np.empty(self._split_shapes[key], dtype=self._split_dtypes[key])
            for part, a, b in parts:
                wire_keys.append(part)
                targets[part] = whole[a:b]
        requests: dict[int, ps.PullRequest] = {}
        for key, index in ((k, self.shard_index(k)) for k in wire_keys):
            request = requests.setdefault(
                index,
                ps.PullRequest(
                    min_version=min_version,
                    clock=clock,
                    timeout_ms=timeout_ms,
                    worker_id=self.worker_id,
                    chunk_bytes=self.chunk_bytes,
                ),
            )
            request.entries.add(key=key, rows=[int(r) for r in rows.get(key, [])])
        deadline = self.timeout + (timeout_ms or 30_000) / 1000

        def start(i: int, request: ps.PullRequest) -> object:
            size = sum(self._nbytes.get(e.key, 0) for e in request.entries if not e.rows)
            if size > self.chunk_bytes:
                return _StreamResult(self.shards[i].pull_stream(request, timeout=deadline), targets)
            return self.shards[i].pull.future(request, timeout=deadline)

        values = Values()
        values.versions = {}
        clocks = []
        for result in self._fan_out(requests, start).values():
            entries, slowest = codec.decode_pull_response(result) if isinstance(result, bytes) else result  # type: ignore[misc]
            clocks.append(slowest)
            for entry in entries:
                values[entry.key] = entry.dense if entry.dense is not None else entry.values  # type: ignore[assignment]
                values.versions[entry.key] = entry.version
                if entry.dense is not None:
                    self._nbytes[entry.key] = entry.dense.nbytes
        for key, whole in wholes.items():
            self._join(key, values, whole)
        values.slowest_clock = min(clocks, default=0)
        return _ordered(values, keys)

    def _join(self, key: str, values: Values, whole: np.ndarray) -> None:
        """Replace a split key's parts in `values` by the whole array and its lowest version."""
        parts = self._parts[key]
        version = min(values.versions[part] for part, _, _ in parts)
        for part, a, b in parts:
            piece = values.pop(part)
            if not np.shares_memory(piece, whole):  # small parts come unstreamed, as their own arrays
                whole[a:b] = piece
            del values.versions[part]
        values[key] = whole
        values.versions[key] = version

    def _learn_sizes(self) -> None:
        """Ask every shard for its keys: sizes route a large first pull to PullStream, and parts
        named `<key>:part<i>of<n>` reveal keys split across the shards."""
        results = self._fan_out(
            dict.fromkeys(range(len(self.shards)), ps.ListKeysRequest()),
            lambda i, r: self.shards[i].list_keys.future(r, timeout=self.timeout),
        )
        found: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {}
        for response in results.values():
            for info in response.keys:  # type: ignore[attr-defined]
                self._nbytes[info.key] = int(np.prod(info.shape)) * codec.numpy_dtype(info.dtype).itemsize
                part = parse_part(info.key)
                if part is not None and part[2] == len(self.shards):
                    found.setdefault(part[0], {})[part[1]] = (info.key, tuple(info.shape))
                    self._split_dtypes[part[0]] = codec.numpy_dtype(info.dtype)
        for key, parts in found.items():
            if len(parts) != len(self.shards) or key in self._parts:
                continue
            shapes = [parts[i][1] for i in range(len(self.shards))]
            bounds = np.cumsum([0, *(shape[0] for shape in shapes)])
            self._parts[key] = [(parts[i][0], int(bounds[i]), int(bounds[i + 1])) for i in range(len(self.shards))]
            self._split_shapes[key] = (int(bounds[-1]), *shapes[0][1:])

    def push_pull(
        self,
        grads: Mapping[str, np.ndarray | SparseGradient],
        *,
        step: int = 0,
        min_version: int = 0,
        clock: int = 0,
        timeout_ms: int = 0,
    ) -> Values:
        """Push, then pull the same keys (waiting for min_version / clock as in pull)."""
        self.push(grads, step=step)
        return self.pull(list(grads), min_version=min_version, clock=clock, timeout_ms=timeout_ms)

    def list_keys(self) -> list[ps.KeyInfo]:
        results = self._fan_out(
            dict.fromkeys(range(len(self.shards)), ps.ListKeysRequest()),
            lambda i, r: self.shards[i].list_keys.future(r, timeout=self.timeout),
        )
        return sorted((k for r in results.values() for k in r.keys), key=lambda k: k.key)  # type: ignore[attr-defined]

    def stats(self) -> list[ps.StatsResponse]:
        results = self._fan_out(
            dict.fromkeys(range(len(self.shards)), ps.StatsRequest()),
            lambda i, r: self.shards[i].stats.future(r, timeout=self.timeout),
        )
        return [results[i] for i in range(len(self.shards))]  # type: ignore[misc]


def _ordered(values: Values, keys: list[str]) -> Values:
    ordered = Values((k, values[k]) for k in keys)
    ordered.versions = values.versions
    ordered.slowest_clock = values.slowest_clock
    return ordered


class _StreamResult:
    """Adapts a PullStream response iterator to the future-like `result()` used by fan-out.

    Slices are reassembled per key; a key whose slices carry different
    versions (an update landed mid-stream) raises FailedPrecondition-style
    NanodistError so that the caller can pull again.
    """

    def __init__(self, responses: Iterator[bytes], targets: Mapping[str, np.ndarray] | None = None) -> None:
        self.responses = responses
        self.targets = targets or {}  # keys to assemble straight into the caller's memory

    def result(self) -> tuple[list[codec.Entry], int]:
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
                    raise NanodistError(
                        f"{piece.key!r} changed during a streamed pull "
                        f"(versions {out[piece.key].version} and {piece.version}); pull again",
                        grpc.StatusCode.ABORTED,
                    )
                buffer[piece.offset : piece.offset + piece.dense.size] = piece.dense.reshape(-1)
        return list(out.values()), slowest
