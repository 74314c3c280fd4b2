"""Worker processes for the coordination tests: python -m tests.integration.coord_worker ROLE ADDRESS ..."""

import asyncio
import sys
import threading
import time

import grpc

from nanodist.client import BarrierClient, KVStore, LockClient
from nanodist.v1 import barrier_pb2, barrier_pb2_grpc


def cycle(address: str, member: str, parties: str, generations: str) -> None:
    """Waits at "cycle" for each generation in turn, printing "GENERATION START END" per wait
    (CLOCK_MONOTONIC, one clock for every process of the machine) for the history check."""
    with BarrierClient(address, member) as client:
        for expected in range(int(generations)):
            start = time.monotonic()
            released = client.wait("cycle", int(parties), timeout=30)
            print(released.generation, start, time.monotonic(), flush=True)
            assert released.generation == expected, (released, expected)
    print("done", flush=True)


def hold_session(address: str, member: str, barrier: str, ttl: str) -> None:
    BarrierClient(address, member, session_ttl=float(ttl), barriers=[barrier])
    print("ready", flush=True)
    threading.Event().wait()  # until killed


def hold_lock(address: str, name: str, ttl: str) -> None:
    client = LockClient(address, "doomed")
    with client.lock(name, ttl=float(ttl)) as held:
        print(held.fencing_token, flush=True)
        threading.Event().wait()  # until killed


def cas(address: str, key: str, name: str) -> None:
    with KVStore(address) as store:
        store.wait(["go"], timeout=30)  # start together
        swapped, _ = store.compare_set(key, None, name)
    print("won" if swapped else "lost", flush=True)


def add(address: str, key: str, count: str) -> None:
    with KVStore(address) as store:
        for _ in range(int(count)):
            store.add(key, 1)


async def waiters(address: str, parties: str, count: str, offset: str) -> None:
    """`count` concurrent Wait calls as asyncio tasks on one channel; prints the arrival indexes."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = barrier_pb2_grpc.BarrierStub(channel)
        calls = [
            stub.Wait(
                barrier_pb2.WaitRequest(
                    name="crowd",
                    parties=int(parties),
                    member_id=f"m{int(offset) + i}",
                    timeout_ms=60_000,
                )
            )
            for i in range(int(count))
        ]
        responses = await asyncio.gather(*calls)
    print(" ".join(str(r.arrival_index) for r in responses), flush=True)


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "waiters":
        asyncio.run(waiters(*args))
    else:
        {
            "cycle": cycle,
            "hold-session": hold_session,
            "hold-lock": hold_lock,
            "cas": cas,
            "add": add,
        }[role](*args)
