"""ParameterServerClient: init, push, pull and push_pull of numpy dicts across shards."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import grpc
import numpy as np

from nanodist.client.base import Closing
from nanodist.client.errors import NotFound, Unavailable
from nanodist.client.fan_out import fan_out
from nanodist.client.lane import lane_setting
from nanodist.client.optimizers import sgd
from nanodist.client.ps_shard import Pending, Pulled, Shard, StreamedPull, UnaryPull, push_chunks
from nanodist.client.ps_values import SparseGradient, Values
from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import ClientSecurity
from nanodist.client.split_keys import SplitKeys
from nanodist.client.tables import Table, find
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
Request = TypeVar("Request")
Result = TypeVar("Result")


class ParameterServerClient(Closing):
    """A client of one or more parameter-server shards.

    Keys are placed with `shard_of` (CRC-32 modulo shard count); calls to
    different shards run in parallel. UNAVAILABLE is retried with backoff, and
    a retried push reuses its request_id so the server applies it once.
    Push and Pull travel on each shard's tensor lane when it has one (`lanes`,
    else NANODIST_LANES: "on", the default, for shared memory on the shard's
    host and TCP elsewhere; "tcp" for TCP even there; "off" for gRPC alone;
    see nanodist.client.lane). Over gRPC, payloads above `chunk_bytes` go
    through the streaming RPCs in slices of that size: on these machines gRPC
    moves 2 MiB messages several times faster per byte than 64 MiB ones (see
    bench/ps_throughput.py).

    A key of at least `split_bytes` with at least one row per shard is split
    by rows across all shards when it is created (see nanodist.client.sharding
    for the rule); push and pull then reach every shard in parallel and the
    caller still sees one array. Other clients find the parts with ListKeys.

    Failed calls raise the typed exceptions of nanodist.client.errors: a shard
    still unreachable after the retries gives Unavailable.
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
        lanes: str | None = None,
    ) -> None:
        addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not addresses:
            raise ValueError("addresses: ParameterServerClient needs at least one shard address")
        setting = lane_setting(lanes)
        self.shards = [Shard(a, max_message_bytes, security, setting) for a in addresses]
        self.worker_id = worker_id
        # Elastic jobs: every push names the sender's generation and its number of pushers.
        self.membership = codec.NOT_ELASTIC
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.chunk_bytes = min(chunk_bytes, max_message_bytes // 2)
        self.split_bytes = split_bytes
        self._nbytes: dict[str, int] = {}  # value sizes seen, to route large pulls to PullStream
        self._splits = SplitKeys(len(self.shards), split_bytes)
        self._tables: dict[str, Table] = {}

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def shard_index(self, key: str) -> int:
        return self._splits.shard_index(key)

    def _discover(self, keys: Iterable[str]) -> None:
        """Learn sizes and splits of keys this client has not seen (one ListKeys per shard)."""
        if any(k not in self._nbytes and k not in self._splits for k in keys):
            self._learn_sizes()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every shard's channel is connected, or raise Unavailable."""
        for shard in self.shards:
            try:
                grpc.channel_ready_future(shard.channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise Unavailable(f"parameter server {shard.address} unreachable after {timeout}s") from None

    def _fan_out(
        self, calls: Mapping[int, Request], start: Callable[[int, Request], Pending[Result]]
    ) -> dict[int, Result]:
        return fan_out(self.shards, self.retry, calls, start)

    def _each_shard(self, request: Request) -> dict[int, Request]:
        return dict.fromkeys(range(len(self.shards)), request)

    def _pull_call(
        self, i: int, request: ps.PullRequest, deadline: float, size: int, targets: Mapping[str, np.ndarray]
    ) -> Pending[Pulled]:
        """A pull of about `size` bytes from shard i: on its lane if it has one, else unary or streamed gRPC."""
        lane = self.shards[i].lanes.get(self.timeout, size)
        if lane is not None:
            return lane.pull(request, deadline, size, targets)
        if size > self.chunk_bytes:
            return StreamedPull(self.shards[i].pull_stream(request, timeout=deadline), targets)
        return UnaryPull(self.shards[i].pull.future(request, timeout=deadline))

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
            array = np.asarray(value)
            if key not in self._nbytes and key not in self._splits:
                self._splits.plan(key, array)
            for name, piece in self._splits.dense(key, array):
                requests.setdefault(self.shard_index(name), ps.InitRequest()).entries.add(
                    key=name, value=codec.to_proto(piece), optimizer=opt or sgd(0.01)
                )
                self._nbytes[name] = piece.nbytes
                owner[name] = key
        results = self._fan_out(requests, lambda i, r: self.shards[i].init.future(r, timeout=self.timeout))
        created: dict[str, bool] = {}
        for response in results.values():
            for r in response.results:
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
        if self._splits or len(self.shards) > 1:
            self._discover(grads)
        owner: dict[str, str] = {}
        for key, grad in grads.items():
            for entry in self._entries(key, grad):
                owner[entry.key] = key
                payloads.setdefault(self.shard_index(entry.key), []).append(entry)
        return self._push(payloads, owner, step, base, fencing_token)

    def _push(
        self, payloads: dict[int, list[codec.Entry]], owner: dict[str, str], step: int, base: str, fencing_token: int
    ) -> dict[str, int]:
        """One push per shard, in parallel; each key's version after it (a split key: its slowest part)."""
        order = {i: [e.key for e in entries] for i, entries in payloads.items()}

        def start(i: int, entries: list[codec.Entry]) -> Pending[ps.PushResponse]:
            rid = f"{base}/{i}"
            parts = codec.push_parts(entries, self.worker_id, step, rid, fencing_token, self.membership)
            lane = self.shards[i].lanes.get(self.timeout, parts.size)
            if lane is not None:
                return lane.push(parts, self.timeout)
            if sum(_payload_bytes(e) for e in entries) > self.chunk_bytes:
                chunks = push_chunks(
                    entries, self.chunk_bytes, self.worker_id, step, rid, fencing_token, self.membership
                )
                return self.shards[i].push_stream.future(chunks, timeout=self.timeout)
            return self.shards[i].push.future(parts.join(), timeout=self.timeout)

        versions: dict[str, int] = {}
        for i, response in self._fan_out(payloads, start).items():
            for name, version in zip(order[i], response.versions, strict=True):
                key = owner[name]
                versions[key] = min(versions.get(key, version), version)  # a split key: its slowest part
        return versions

    def _entries(self, key: str, grad: np.ndarray | SparseGradient) -> list[codec.Entry]:
        """The wire entries of one key's gradient (several for a split key)."""
        if isinstance(grad, SparseGradient):
            return [
                codec.Entry(key=name, rows=np.asarray(piece.rows, dtype=np.int64), values=piece.values)
                for name, piece in self._splits.sparse(key, grad)
            ]
        return [
            codec.Entry(key=name, dense=codec.as_wire_array(piece))
            for name, piece in self._splits.dense(key, np.asarray(grad))
        ]

    def pull(
        self,
        keys: Iterable[str],
        *,
        min_version: int = 0,
        clock: int = 0,
        rows: Mapping[str, np.ndarray] | None = None,
        timeout_ms: int = 0,
        out: Mapping[str, np.ndarray] | None = None,
    ) -> Values:
        """Pull values (read-only arrays) and their versions.

        min_version (BSP) and clock (SSP) make the server wait, up to
        timeout_ms, until the values are fresh enough. `rows` selects rows of
        2-D keys; those come back as arrays of shape [len(rows), columns].
        `out` gives contiguous arrays of the keys' shapes and dtypes for the
        values to land in (large values stream straight into them), and
        those arrays are returned. A key updated while it streamed raises
        Aborted: pull again.
        """
        keys = list(keys)
        rows = rows or {}
        out = {k: a for k, a in (out or {}).items() if k not in rows}
        self._discover(k for k in keys if k not in rows)
        wire_keys: list[str] = []
        wholes: dict[str, np.ndarray] = {}  # split keys, assembled in place by the streamed parts
        targets: dict[str, np.ndarray] = {}
        for key in keys:
            split = self._splits.get(key)
            if split is None:
                wire_keys.append(key)
                if key in out:
                    targets[key] = out[key]
                continue
            if key in rows:
                raise ValueError(f"rows: {key!r} is split across shards; pull it whole, not by rows")
            wholes[key], slices = self._splits.buffer(key, out.get(key))
            targets.update(slices)
            wire_keys += slices
        requests: dict[int, ps.PullRequest] = {}
        for key in wire_keys:
            request = requests.setdefault(
                self.shard_index(key),
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

        def start(i: int, request: ps.PullRequest) -> Pending[Pulled]:
            size = sum(self._nbytes.get(e.key, 0) for e in request.entries if not e.rows)
            return self._pull_call(i, request, deadline, size, targets)

        values = Values()
        clocks = []
        for entries, slowest in self._fan_out(requests, start).values():
            clocks.append(slowest)
            for entry in entries:
                array = entry.dense if entry.dense is not None else entry.values
                if array is None:
                    raise codec.CodecError(f"{entry.key}: the shard sent neither dense nor sparse values")
                values[entry.key] = array
                values.versions[entry.key] = entry.version
                if entry.dense is not None:
                    self._nbytes[entry.key] = entry.dense.nbytes
        for key, whole in wholes.items():
            self._splits.join(key, values, whole)
        for key, target in out.items():
            if key in values:
                if not np.shares_memory(values[key], target):  # it came unstreamed
                    np.copyto(target, values[key])
                values[key] = target
        return Values(((k, values[k]) for k in keys), values.versions, min(clocks, default=0))

    # --- embedding tables (see nanodist.client.tables) --------------------

    def init_table(
        self,
        name: str,
        rows: int,
        columns: int,
        *,
        optimizer: ps.Optimizer | None = None,
        initializer: ps.RowInitializer | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> bool:
        """Declare a table of `rows` x `columns` split across every shard, its rows created as they are
        pushed (first writer wins). Returns whether this call created it."""
        table = Table.plan(name, rows, columns, np.dtype(dtype), len(self.shards))
        wire_dtype = codec.proto_dtype(table.dtype)
        requests = {
            i: ps.InitRequest(
                entries=[
                    ps.InitEntry(
                        key=key,
                        table=table.spec(i, initializer or ps.RowInitializer(), wire_dtype),
                        optimizer=optimizer or sgd(0.01),
                    )
                ]
            )
            for i, key in enumerate(table.parts)
        }
        results = self._fan_out(requests, lambda i, r: self.shards[i].init.future(r, timeout=self.timeout))
        self._tables[name] = table
        return any(r.created for response in results.values() for r in response.results)

    def table(self, name: str) -> Table:
        """The table `name`, found on the shards if another client declared it; NotFound if none did."""
        table = self._tables.get(name)
        if table is None:
            table = find(name, self.list_keys(), len(self.shards))
            if table is None:
                raise NotFound(f"table {name!r} does not exist on every shard; declare it with init_table first")
            self._tables[name] = table
        return table

    def pull_rows(
        self, ids: Mapping[str, np.ndarray], *, min_version: int = 0, clock: int = 0, timeout_ms: int = 0
    ) -> Values:
        """Rows of tables, one call per shard for all tables: values[name][k] is row ids[name][k].

        Rows never pushed come back with their initial values. min_version and
        clock wait as in pull; a table's version is its slowest part's.
        """
        request = {
            i: ps.PullRequest(min_version=min_version, clock=clock, timeout_ms=timeout_ms, worker_id=self.worker_id)
            for i in range(len(self.shards))
        }
        placed: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name, wanted in ids.items():
            table = self.table(name)
            rows = table.check_ids(wanted)
            placed[name] = []
            for part, local, positions in table.split(rows):
                if len(local):
                    request[part].entries.add(key=table.parts[part], rows=local.tolist())
                    placed[name].append((part, positions))
        requests = {i: r for i, r in request.items() if r.entries}
        deadline = self.timeout + (timeout_ms or 30_000) / 1000

        def start(i: int, request: ps.PullRequest) -> Pending[Pulled]:
            rows = sum(len(e.rows) for e in request.entries)
            size = rows * max(t.columns * t.dtype.itemsize for t in self._tables.values())
            return self._pull_call(i, request, deadline, size, {})

        by_key: dict[str, codec.Entry] = {}
        clocks = []
        for entries, slowest in self._fan_out(requests, start).values():
            clocks.append(slowest)
            by_key.update((e.key, e) for e in entries)
        values = Values(slowest_clock=min(clocks, default=0))
        for name, wanted in ids.items():
            table = self._tables[name]
            out = np.empty((len(np.asarray(wanted).reshape(-1)), table.columns), dtype=table.dtype)
            for part, positions in placed[name]:
                entry = by_key[table.parts[part]]
                if entry.values is None:
                    raise codec.CodecError(f"{entry.key}: the shard sent no rows")
                out[positions] = entry.values
                values.versions[name] = min(values.versions.get(name, entry.version), entry.version)
            values[name] = out
        return values

    def push_rows(
        self, grads: Mapping[str, SparseGradient], *, step: int = 0, request_id: str | None = None
    ) -> dict[str, int]:
        """Push row gradients of tables, one call per shard for all tables; duplicate rows add up.

        Every part of every table gets an entry, empty if no row of it is
        pushed, so that a BSP step completes on every shard.
        """
        payloads: dict[int, list[codec.Entry]] = {}
        owner: dict[str, str] = {}
        for name, grad in grads.items():
            table = self.table(name)
            rows = table.check_ids(grad.rows)
            values = np.asarray(grad.values, dtype=table.dtype).reshape(len(rows), table.columns)
            for part, local, positions in table.split(rows):
                key = table.parts[part]
                payloads.setdefault(part, []).append(codec.Entry(key=key, rows=local, values=values[positions]))
                owner[key] = name
        return self._push(payloads, owner, step, request_id or uuid.uuid4().hex, 0)

    def _learn_sizes(self) -> None:
        """Ask every shard for its keys: sizes route a large first pull to PullStream, and parts
        named `<key>:part<i>of<n>` reveal keys split across the shards."""
        infos = self.list_keys()
        for info in infos:
            self._nbytes[info.key] = int(np.prod(info.shape)) * codec.numpy_dtype(info.dtype).itemsize
        self._splits.learn(infos)

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
            self._each_shard(ps.ListKeysRequest()),
            lambda i, r: self.shards[i].list_keys.future(r, timeout=self.timeout),
        )
        return sorted((k for r in results.values() for k in r.keys), key=lambda k: k.key)

    def stats(self) -> list[ps.StatsResponse]:
        results = self._fan_out(
            self._each_shard(ps.StatsRequest()),
            lambda i, r: self.shards[i].stats.future(r, timeout=self.timeout),
        )
        return [results[i] for i in range(len(self.shards))]


def _payload_bytes(entry: codec.Entry) -> int:
    array = entry.dense if entry.dense is not None else entry.values
    return 0 if array is None else array.nbytes
