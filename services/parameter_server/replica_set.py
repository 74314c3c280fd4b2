"""A shard kept by several replicas (`nanodist serve ps --replica-set NAME --coordinator LOCK`): which
replica is primary, and the backups' side of replication (docs/durability.md, "Replica sets").

Every replica waits in line for the lock `ps-replica-set/NAME` on the lock service (embedded, or
replicas on etcd). The holder is primary; its fencing token is the epoch. The key
`ps-replica-set/NAME` in the lock service's key-value store is the set's record: the primary's
address, its epoch and the in-sync set (process incarnations, so that a replica restarted without
its state is never taken for one that was in sync). A replica granted the lock takes over only if
the record names it in sync (or no record exists yet); it then writes the record anew with itself
alone in sync, and the other replicas follow it from a fresh snapshot.

A primary renews its lease every quarter TTL and counts it valid until 0.9 TTL after the last renewal
it sent; past that, or once its record was changed by another, it stops serving: the process exits
(status 3), so that its supervisor starts it again as a new backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from nanodist.services.common.errors import ServiceError
from nanodist.services.parameter_server import checkpoint, init_entry
from nanodist.services.parameter_server.coordinator import Coordinator
from nanodist.services.parameter_server.replication import Replicator
from nanodist.services.parameter_server.store import Store
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec

DEPOSED_EXIT_CODE = 3
log = logging.getLogger("nanodist.ps.replica_set")


class ReplicaSet:
    def __init__(
        self,
        name: str,
        coordinator: Coordinator,
        ttl: float,
        service: Any,  # the ParameterServerService whose store this set keeps
        new_store: Callable[[], Store],
        max_message_bytes: int,
    ) -> None:
        self.name = name
        self.coordinator = coordinator
        self.ttl = ttl
        self.service = service
        self.new_store = new_store
        self.max_message_bytes = max_message_bytes
        self.key = f"ps-replica-set/{name}"
        self.incarnation = uuid.uuid4().hex
        self.advertise = ""
        self.role = "joining"
        self.primary = ""
        self.epoch = 0
        self.seq = 0  # the last change applied here
        self.valid_until = 0.0
        self.replicator = Replicator(lambda: service.store, self._publish, self.check_serving, lag_limit=ttl)
        self._record: bytes | None = None  # the set's record as this primary last wrote it
        self._following: asyncio.Task[None] | None = None
        self._promoting = False
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, advertise: str) -> None:
        self.advertise = advertise
        for work in (self._contend(), self._follow_while_backup()):
            task = asyncio.get_running_loop().create_task(work)
            self._tasks.add(task)

    def check_serving(self) -> None:
        """UNAVAILABLE, naming the primary, unless this replica is the primary and its lease is valid."""
        if self.role == "primary" and time.monotonic() < self.valid_until:
            return
        where = f"the primary is {self.primary}" if self.primary and self.role != "primary" else "no primary is known"
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"replica {self.advertise} of replica set {self.name!r} is {self._role_now()}; {where}: retry there",
        )

    def _role_now(self) -> str:
        return "a primary whose lease lapsed" if self.role == "primary" else f"a {self.role} replica"

    def status(self) -> ps.ReplicaSetStatus:
        primary = self.advertise if self.role == "primary" else self.primary
        seq = self.replicator.seq if self.role == "primary" else self.seq
        followers = self.replicator.status() if self.role == "primary" else []
        return ps.ReplicaSetStatus(
            name=self.name, role=self.role, primary=primary, epoch=self.epoch, seq=seq, followers=followers
        )

    # --- who is primary ---------------------------------------------------------------------------

    def _deposed(self, why: str) -> None:
        log.error(
            "replica %s of replica set %r is no longer primary (%s): exiting so that it rejoins as a backup",
            self.advertise,
            self.name,
            why,
        )
        logging.shutdown()
        os._exit(DEPOSED_EXIT_CODE)

    def _new_record(self, in_sync: list[str]) -> bytes:
        record = {"epoch": self.epoch, "primary": self.advertise, "incarnation": self.incarnation}
        return json.dumps({**record, "in_sync": [self.incarnation, *in_sync]}).encode()

    async def _publish(self, in_sync: list[str]) -> None:
        """Write the set's record with this primary and `in_sync`; a record changed by another deposes it."""
        record = self._new_record(in_sync)
        if not await self.coordinator.compare_and_swap(self.key, self._record, record):
            self._deposed("the replica set's record was changed by another replica")
        self._record = record

    async def _contend(self) -> None:
        while True:
            try:
                await self._take_over_when_granted()
            except (grpc.aio.AioRpcError, ServiceError) as error:
                log.warning("replica set %r: waiting for the lock failed (%s); waiting again", self.name, _short(error))
                await asyncio.sleep(1.0)

    async def _take_over_when_granted(self) -> None:
        owner = f"{self.advertise}/{self.incarnation[:8]}"
        while True:
            granted = await self.coordinator.acquire(self.key, owner, self.ttl)
            lease, epoch = granted.lease_id, granted.fencing_token
            sent = time.monotonic()
            if not await self.coordinator.keep_alive(lease):
                continue
            self.valid_until = sent + 0.9 * granted.ttl_ms / 1000
            found = await self.coordinator.get(self.key)
            state = json.loads(found) if found is not None else None
            if state is not None and self.incarnation not in state["in_sync"]:
                log.warning(
                    "replica set %r: the lock came to %s, which is not in sync with epoch %d's primary %s; it "
                    "passes the lock on (no replica that is may be alive: then the set waits for one)",
                    self.name, self.advertise, state["epoch"], state["primary"],
                )  # fmt: skip
                await self.coordinator.release(self.key, lease)
                await asyncio.sleep(self.ttl)
                continue
            self.epoch = epoch
            record = self._new_record([])
            if not await self.coordinator.compare_and_swap(self.key, found, record):
                await self.coordinator.release(self.key, lease)  # the record moved meanwhile: read it again
                continue
            self._record = record
            await self._promote()
            await self._renew(lease, granted.ttl_ms / 1000)

    async def _promote(self) -> None:
        self._promoting = True  # the follow loop stops rather than start again
        if self._following is not None:
            self._following.cancel()
            await asyncio.gather(self._following, return_exceptions=True)  # its end, however it ended
        self.role = "primary"
        self.primary = self.advertise
        self.replicator.epoch = self.epoch
        self.replicator.seq = self.seq
        log.info("replica %s is primary of replica set %r, epoch %d, at change %d",
                 self.advertise, self.name, self.epoch, self.seq)  # fmt: skip

    async def _renew(self, lease: str, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 4)
            sent = time.monotonic()
            try:
                renewed = await self.coordinator.keep_alive(lease, timeout=ttl / 4)
            except grpc.aio.AioRpcError:
                renewed = None
            if renewed is False:
                self._deposed(f"its lease on {self.key} lapsed")
            if renewed:
                self.valid_until = sent + 0.9 * ttl
            if time.monotonic() >= self.valid_until:
                self._deposed(f"its lease on {self.key} could not be renewed for {ttl:g}s")

    # --- the backup's side ------------------------------------------------------------------------

    async def _follow_while_backup(self) -> None:
        while not self._promoting:
            try:
                found = await self.coordinator.get(self.key)
            except (grpc.aio.AioRpcError, ServiceError) as error:
                log.warning("replica set %r: reading its record failed (%s)", self.name, _short(error))
                await asyncio.sleep(1.0)
                continue
            state = json.loads(found) if found is not None else None
            if state is None or state["incarnation"] == self.incarnation:
                await asyncio.sleep(0.2)
                continue
            self.primary, self.epoch = state["primary"], state["epoch"]
            self._following = asyncio.get_running_loop().create_task(self._follow(state["primary"], state["epoch"]))
            try:
                await self._following
            except asyncio.CancelledError:
                if self._promoting:  # the stream was ended for the takeover, not this loop
                    return
                raise
            except (grpc.aio.AioRpcError, ServiceError, OSError, ValueError) as error:
                log.info("following %s (epoch %d) ended: %s", state["primary"], state["epoch"], _short(error))
            if not self._promoting:
                self.role = "joining"
                await asyncio.sleep(0.2)

    async def _follow(self, primary: str, epoch: int) -> None:
        acks: asyncio.Queue[ps.FollowRequest] = asyncio.Queue()

        async def outgoing() -> AsyncIterator[ps.FollowRequest]:
            yield ps.FollowRequest(address=self.advertise, incarnation=self.incarnation)
            while True:
                yield await acks.get()

        options = [("grpc.max_receive_message_length", self.max_message_bytes)]
        directory = tempfile.mkdtemp(prefix="nanodist-snapshot-")
        async with grpc.aio.insecure_channel(primary, options=options) as channel:
            follow = channel.stream_stream(
                "/nanodist.v1.ParameterServer/Follow",
                request_serializer=ps.FollowRequest.SerializeToString,
                response_deserializer=ps.FollowRecord.FromString,
            )
            call = follow(outgoing())
            watcher = asyncio.get_running_loop().create_task(self._watch_epoch(epoch, call))
            try:
                async for record in call:
                    if record.epoch != epoch:
                        raise ValueError(f"a record of epoch {record.epoch} on a stream of epoch {epoch}")
                    if self._apply(record, directory):
                        acks.put_nowait(ps.FollowRequest(acked_seq=self.seq))
            finally:
                watcher.cancel()
                shutil.rmtree(directory, ignore_errors=True)

    async def _watch_epoch(self, epoch: int, call: grpc.aio.StreamStreamCall) -> None:
        """End the stream once another primary took over (a frozen primary's stream would only stall)."""
        while True:
            await asyncio.sleep(self.ttl / 2)
            with contextlib.suppress(ServiceError, grpc.aio.AioRpcError):
                found = await self.coordinator.get(self.key)
                if found is not None and json.loads(found)["epoch"] != epoch:
                    call.cancel()
                    return

    def _apply(self, record: ps.FollowRecord, directory: str) -> bool:
        """Apply one record of the primary's stream; whether it is to be acknowledged."""
        body = record.WhichOneof("body")
        if body == "snapshot_file":
            folder = os.path.join(directory, "ckpt-00000001")
            os.makedirs(folder, exist_ok=True)
            name = os.path.basename(record.snapshot_file.name)
            with open(os.path.join(folder, name), "ab") as f:
                f.write(record.snapshot_file.data)
            return False
        if body == "snapshot_done":
            store = self.new_store()
            if checkpoint.restore(directory, store) is None:
                raise ValueError("the primary's snapshot does not restore")
            self.service.store = store
            self.role = "backup"
            log.info("replica %s follows %s from change %d (epoch %d)", self.advertise, self.primary,
                     record.seq, record.epoch)  # fmt: skip
        elif body == "init":
            init_entry.apply_logged_init(self.service.store, record.init)
        elif body == "push":
            self.service.apply(codec.decode_push(record.push))
        self.seq = record.seq
        return True


def _short(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)
