"""Barrier, lock and counter latency, each as a multiple of one gRPC Python echo round trip.

Anchors in the same run: a 100-byte raw gRPC echo, mpi4py Barrier (mpiexec -n 2),
a torch.distributed gloo barrier, redis-py SET NX PX + DEL against Debian's
redis-server, and torch.distributed.TCPStore.add. An anchor whose software is
missing is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, median_us, serve, start, stop_all, table, wait_ready  # noqa: E402

from nanodist.client import KVStore, LockClient  # noqa: E402
from nanodist.v1 import barrier_pb2, barrier_pb2_grpc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


async def barrier_rounds(address: str, members: int, rounds: int) -> float:
    """Median µs between consecutive releases seen by member 0, all members as asyncio tasks."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = barrier_pb2_grpc.BarrierStub(channel)
        releases: list[float] = []

        async def member(index: int) -> None:
            request = barrier_pb2.WaitRequest(
                name=f"bench-{members}", parties=members, member_id=f"m{index}", timeout_ms=60_000
            )
            for _ in range(rounds):
                await stub.Wait(request)
                if index == 0:
                    releases.append(time.perf_counter())

        await asyncio.gather(*(member(i) for i in range(members)))
    gaps = [b - a for a, b in zip(releases[10:], releases[11:], strict=False)]
    return statistics.median(gaps) * 1e6


async def release_thousand(address: str, waiters: int = 1000) -> float:
    """Seconds from the last member's arrival until all `waiters` Wait calls have returned."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = barrier_pb2_grpc.BarrierStub(channel)

        def wait(index: int) -> grpc.aio.UnaryUnaryCall:
            return stub.Wait(
                barrier_pb2.WaitRequest(name="crowd", parties=waiters, member_id=f"m{index}", timeout_ms=120_000)
            )

        early = [asyncio.ensure_future(wait(i)) for i in range(waiters - 1)]
        status = barrier_pb2.BarrierStatusRequest(name="crowd")
        while True:  # until every early waiter is registered at the server
            await asyncio.sleep(0.05)
            try:
                if len((await stub.Status(status)).barriers[0].arrived) == waiters - 1:
                    break
            except grpc.aio.AioRpcError:
                continue
        begin = time.perf_counter()
        await asyncio.gather(wait(waiters - 1), *early)
        return time.perf_counter() - begin


def mpi_barrier_us() -> float | str:
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        return "skipped: mpiexec not found (pip install mpich)"
    out = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, os.path.join(HERE, "anchors.py"), "mpi-barrier"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return float(out.stdout.split()[-1]) if out.returncode == 0 else f"skipped: {out.stderr.strip()[-200:]}"


def torch_anchor(kind: str) -> float | str:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "skipped: torch not installed (pip install torch; bench only)"
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "anchors.py"), kind],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return float(out.stdout.split()[-1]) if out.returncode == 0 else f"skipped: {out.stderr.strip()[-200:]}"


def redis_lock_us(count: int) -> float | str:
    server_bin = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return "skipped: redis-py not installed (pip install redis; bench only)"
    if server_bin is None:
        return "skipped: redis-server not installed (apt-get install redis-server)"
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        server = subprocess.Popen(
            [
                server_bin,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                work,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

            def take_and_release() -> None:
                assert client.set("lock", "me", nx=True, px=10_000)
                client.delete("lock")

            return median_us(take_and_release, count)
        finally:
            server.terminate()
            server.wait()


def ratio(value: float | str, unit: float) -> str:
    return f"{value / unit:.2f}" if isinstance(value, float) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    echo_port = free_port()
    servers = [start([sys.executable, os.path.join(HERE, "raw_echo_server.py"), str(echo_port)])]
    try:
        barrier_server, barrier_address = serve("barrier")
        servers.append(barrier_server)
        lock_server, lock_address = serve("lock")
        servers.append(lock_server)
        wait_ready(f"127.0.0.1:{echo_port}")
        channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo = channel.unary_unary("/raw.Raw/Echo")
        payload = b"x" * 100
        echo_us = median_us(lambda: echo(payload), args.calls)

        rows: list[list[object]] = [["gRPC Python echo, 100 B (the unit)", echo_us, "1.00"]]
        for members in (2, 8, 32):
            rounds = args.rounds if members < 32 else args.rounds // 2
            us = asyncio.run(barrier_rounds(barrier_address, members, rounds))
            rows.append([f"nanodist barrier round, {members} members", us, ratio(us, echo_us)])
            print(f"  barrier {members} done", file=sys.stderr)
        released = asyncio.run(release_thousand(barrier_address))
        rows.append(["1,000 waiters released (last arrival to all returned)", released * 1e6, "-"])
        for name, value in (
            ("mpi4py Barrier, 2 ranks", mpi_barrier_us()),
            ("torch gloo barrier, 2 ranks", torch_anchor("gloo-barrier")),
        ):
            rows.append([name, value, ratio(value, echo_us)])

        locks = LockClient(lock_address, "bench")

        def acquire_release() -> None:
            locks.release(locks.acquire("bench-lock", ttl=10))

        lock_us = median_us(acquire_release, args.calls)
        rows.append(["nanodist acquire+release", lock_us, ratio(lock_us, echo_us)])
        redis_us = redis_lock_us(args.calls)
        rows.append(["redis-py SET NX PX + DEL", redis_us, ratio(redis_us, echo_us)])

        store = KVStore(lock_address)
        add_us = median_us(lambda: store.add("bench-counter", 1), args.calls)
        rows.append(["nanodist KV Add", add_us, ratio(add_us, echo_us)])
        tcp_add = torch_anchor("tcpstore-add")
        rows.append(["torch TCPStore.add", tcp_add, ratio(tcp_add, echo_us)])

        print("coordination latency (medians, µs), and as a multiple of one gRPC echo round trip")
        print(
            table(
                ["operation", "µs", "× echo"],
                [[r[0], r[1] if isinstance(r[1], float) else r[1], r[2]] for r in rows],
            )
        )
    finally:
        stop_all(servers)


if __name__ == "__main__":
    main()
