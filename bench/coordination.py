"""Barrier, lock and counter latency on both coordination stores, side by side, and the time from the
etcd leader's kill -9 to the next granted lock.

The embedded store and etcd (three members of Debian's etcd-server on this machine, `make etcd`), each
behind its own barrier and lock services. Anchors in the same run: a 100-byte raw gRPC echo, etcd's
own put and transaction through the services' etcd client, mpi4py Barrier (mpiexec -n 2),
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
from common import free_port, median_us, serve, start, start_etcd, stop_all, table, wait_ready  # noqa: E402

from nanodist.client import KVStore, LockClient  # noqa: E402
from nanodist.etcd import rpc_pb2, rpc_pb2_grpc  # noqa: E402
from nanodist.services.common.etcd import Etcd, EtcdAddress, absent, put_op  # noqa: E402
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


def store_medians(barrier_address: str, lock_address: str, args: argparse.Namespace) -> dict[str, float]:
    """The nanodist operations against one pair of services, in µs (medians; the 1,000 released: total)."""
    found: dict[str, float] = {}
    for members in (2, 8, 32):
        rounds = args.rounds if members < 32 else args.rounds // 2
        found[f"barrier round, {members} members"] = asyncio.run(barrier_rounds(barrier_address, members, rounds))
        print(f"  barrier {members} done", file=sys.stderr)
    found["1,000 waiters released (last arrival to all returned)"] = (
        asyncio.run(release_thousand(barrier_address)) * 1e6
    )
    locks = LockClient(lock_address, "bench")
    found["lock acquire+release"] = median_us(lambda: locks.release(locks.acquire("bench-lock", ttl=10)), args.calls)
    store = KVStore(lock_address)
    found["KV Add"] = median_us(lambda: store.add("bench-counter", 1), args.calls)
    locks.close()
    store.close()
    return found


async def etcd_anchor_us(endpoints: list[str], calls: int) -> tuple[float, float]:
    """etcd's own put and compare-and-put transaction, through the services' client: medians in µs."""
    etcd = Etcd(EtcdAddress(tuple(endpoints), "bench"))
    key = etcd.address.prefix + b"anchor"
    txn = rpc_pb2.TxnRequest(compare=[absent(etcd.address.prefix + b"never")], success=[put_op(key, b"1")])
    medians = []
    for operation in (lambda: etcd.put(key, b"1"), lambda: etcd.txn(txn)):
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            await operation()
            times.append(time.perf_counter() - began)
        medians.append(statistics.median(times) * 1e6)
    await etcd.close()
    return medians[0], medians[1]


async def leader_of(endpoints: list[str]) -> int:
    """The index in endpoints of the etcd leader."""
    for index, endpoint in enumerate(endpoints):
        async with grpc.aio.insecure_channel(endpoint) as channel:
            status = await rpc_pb2_grpc.MaintenanceStub(channel).Status(rpc_pb2.StatusRequest(), timeout=5)
            if status.leader == status.header.member_id:
                return index
    raise RuntimeError("no etcd member says it leads")


def lock_after_leader_kill(members: list[subprocess.Popen[bytes]], endpoints: list[str], lock_address: str) -> float:
    """Seconds from the etcd leader's kill -9 to the next lock granted through the lock service."""
    leader = asyncio.run(leader_of(endpoints))
    locks = LockClient(lock_address, "after-kill")
    locks.release(locks.acquire("warm", ttl=10))
    members[leader].kill()
    began = time.perf_counter()
    locks.release(locks.acquire("after-kill", ttl=10, timeout=60))
    took = time.perf_counter() - began
    locks.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()

    echo_port = free_port()
    servers = [start([sys.executable, os.path.join(HERE, "raw_echo_server.py"), str(echo_port)])]
    etcd_dir = tempfile.mkdtemp(prefix="nanodist-bench-etcd-")
    try:
        wait_ready(f"127.0.0.1:{echo_port}")
        channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo = channel.unary_unary("/raw.Raw/Echo")
        payload = b"x" * 100
        echo_us = median_us(lambda: echo(payload), args.calls)

        embedded = [serve("barrier"), serve("lock")]
        servers += [process for process, _ in embedded]
        print("embedded store", file=sys.stderr)
        on_embedded = store_medians(embedded[0][1], embedded[1][1], args)
        stop_all([process for process, _ in embedded])

        members, endpoints = start_etcd(etcd_dir)
        servers += members
        store = "etcd://" + ",".join(endpoints) + "/bench"
        on_etcd_servers = [serve("barrier", "--store", store), serve("lock", "--store", store)]
        servers += [process for process, _ in on_etcd_servers]
        print("etcd store, 3 members", file=sys.stderr)
        on_etcd = store_medians(on_etcd_servers[0][1], on_etcd_servers[1][1], args)
        put_us, txn_us = asyncio.run(etcd_anchor_us(endpoints, args.calls))
        recovery = lock_after_leader_kill(members, endpoints, on_etcd_servers[1][1])

        rows: list[list[object]] = [["gRPC Python echo, 100 B (the unit)", echo_us, "-", "-"]]
        for operation, us in on_embedded.items():
            rows.append([f"nanodist {operation}", us, on_etcd[operation], f"{on_etcd[operation] / us:.2f}"])
        rows += [["etcd Put (anchor: the services' etcd client)", "-", put_us, "-"],
                 ["etcd Txn, compare and put (anchor)", "-", txn_us, "-"]]  # fmt: skip
        anchors = [
            ("mpi4py Barrier, 2 ranks", mpi_barrier_us()),
            ("torch gloo barrier, 2 ranks", torch_anchor("gloo-barrier")),
            ("redis-py SET NX PX + DEL", redis_lock_us(args.calls)),
            ("torch TCPStore.add", torch_anchor("tcpstore-add")),
        ]
        rows += [[name, value, "-", "-"] for name, value in anchors]
        print("coordination latency (medians, µs): the embedded store and etcd (3 members, one machine)")
        print(table(["operation", "embedded µs", "etcd µs", "etcd ÷ embedded"], rows))
        print(f"echo unit {echo_us:.0f} µs; each embedded operation ÷ echo: "
              + ", ".join(f"{op} {us / echo_us:.1f}" for op, us in on_embedded.items()))  # fmt: skip
        print(f"etcd leader killed (kill -9) to the next lock granted: {recovery:.2f} s "
              "(etcd's election timeout here: 1 s)")  # fmt: skip
    finally:
        stop_all(servers)
        shutil.rmtree(etcd_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
