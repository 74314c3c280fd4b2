"""The key-value store on etcd: the same calls and guarantees as kv.KeyValueStore, no state of its own.

Keys live under <prefix>kv/, the request ids of Adds and swaps under <prefix>kv-request/ (with the
key and the counter the call returned), attached to an hour-long lease that the replica renews: a
retry is answered as the first call was for at least an hour, whichever replica it reaches. Every
change is one etcd transaction that compares what it read, so replicas never lose an update.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from nanodist.etcd import rpc_pb2
from nanodist.services.common.errors import invalid, not_found
from nanodist.services.common.etcd import Etcd, LongLease, absent, put_op, read_op
from nanodist.services.lock.kv import counter_sum, reused_request_id

REQUEST_ID_TTL_S = 3600
TXN_OPS = 128  # etcd's default --max-txn-ops

Compare = rpc_pb2.Compare


def _found(response: rpc_pb2.ResponseOp) -> bytes | None:
    kvs = response.response_range.kvs
    return kvs[0].value if kvs else None


class EtcdKeyValueStore:
    def __init__(self, etcd: Etcd, max_value_bytes: int) -> None:
        self.etcd = etcd
        self.max_value_bytes = max_value_bytes
        self._values = etcd.address.prefix + b"kv/"
        self._requests = etcd.address.prefix + b"kv-request/"
        self.request_lease = LongLease(etcd, REQUEST_ID_TTL_S)

    def _key(self, key: str) -> bytes:
        return self._values + key.encode()

    def check_value(self, value: bytes, field: str = "value") -> bytes:
        if len(value) > self.max_value_bytes:
            raise invalid(f"{field}: {len(value)} bytes, at most {self.max_value_bytes} allowed")
        return value

    async def close(self) -> None:
        await self.request_lease.close()

    @staticmethod
    def _earlier(request_id: str, raw: bytes | None, key: str, adding: bool) -> tuple[bool, int | None]:
        """Whether a call with this request id was applied before, and the counter an Add returned."""
        if raw is None:
            return False, None
        first_key, counter = json.loads(raw)
        if first_key != key or (counter is not None) != adding:
            raise reused_request_id(request_id, first_key, counter is not None)
        return True, counter

    async def get(self, key: str) -> bytes:
        found = await self.etcd.get(self._key(key))
        if found is None:
            raise not_found(f"key: {key!r} does not exist")
        return found.value

    async def set(self, key: str, value: bytes) -> None:
        await self.etcd.put(self._key(key), self.check_value(value))

    async def delete(self, key: str) -> bool:
        return await self.etcd.delete(self._key(key)) > 0

    async def compare_and_swap(
        self, key: str, expected: bytes, expect_absent: bool, desired: bytes, request_id: str = ""
    ) -> tuple[bool, bytes | None]:
        self.check_value(desired, "desired")
        stored = self._key(key)
        match = (
            absent(stored)
            if expect_absent
            else Compare(key=stored, target=Compare.VALUE, result=Compare.EQUAL, value=expected)
        )
        txn = rpc_pb2.TxnRequest(compare=[match], success=[put_op(stored, desired)], failure=[read_op(stored)])
        if request_id:
            remembered = self._requests + request_id.encode()
            txn.compare.append(absent(remembered))
            txn.success.append(put_op(remembered, json.dumps([key, None]).encode()))  # under the request lease
            txn.failure.append(read_op(remembered))
        response = await (self.request_lease.txn(txn) if request_id else self.etcd.txn(txn))
        if response.succeeded:
            return True, desired
        if request_id and self._earlier(request_id, _found(response.responses[1]), key, adding=False)[0]:
            return True, desired  # a retry of a call that swapped: answer as it was answered
        return False, _found(response.responses[0])

    async def add(self, key: str, delta: int, request_id: str = "") -> int:
        stored = self._key(key)
        remembered = self._requests + request_id.encode()
        while True:
            reads = [read_op(stored), *([read_op(remembered)] if request_id else [])]
            current = await self.etcd.txn(rpc_pb2.TxnRequest(success=reads))
            if request_id:
                seen, counter = self._earlier(request_id, _found(current.responses[1]), key, adding=True)
                if seen and counter is not None:
                    return counter  # a retry: the first call's value, and nothing added again
            kvs = current.responses[0].response_range.kvs
            value = counter_sum(key, kvs[0].value if kvs else b"0", delta)
            unchanged = (
                Compare(key=stored, target=Compare.MOD, result=Compare.EQUAL, mod_revision=kvs[0].mod_revision)
                if kvs
                else absent(stored)
            )
            txn = rpc_pb2.TxnRequest(compare=[unchanged], success=[put_op(stored, str(value).encode())])
            if request_id:
                txn.compare.append(absent(remembered))
                txn.success.append(put_op(remembered, json.dumps([key, value]).encode()))  # under the request lease
            if (await (self.request_lease.txn(txn) if request_id else self.etcd.txn(txn))).succeeded:
                return value
            # another replica changed the key (or answered this request id) in between: read again

    async def _first_missing(self, keys: list[str]) -> tuple[str, int] | None:
        """The first of keys that does not exist, and the revision at which it did not; None if all do."""
        for start in range(0, len(keys), TXN_OPS):
            chunk = keys[start : start + TXN_OPS]
            response = await self.etcd.txn(rpc_pb2.TxnRequest(success=[read_op(self._key(k)) for k in chunk]))
            for key, found in zip(chunk, response.responses, strict=True):
                if not found.response_range.kvs:
                    return key, int(response.header.revision)
        return None

    async def wait(self, keys: list[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (missing := await self._first_missing(keys)) is not None:
            key, revision = missing
            remaining = deadline - loop.time()
            if remaining <= 0:
                absent = [k for k in keys if await self.etcd.get(self._key(k)) is None]
                raise TimeoutError(f"waited {timeout:g}s; keys still missing: {', '.join(absent[:20])}")
            # Watch the one key read missing, from just after that read: its creation wakes this wait,
            # which then reads every key again (an event is a hint, never the state).
            async with self.etcd.watch(self._key(key), revision + 1) as events:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(events.get(), remaining)
