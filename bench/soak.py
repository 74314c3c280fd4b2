"""Load and soak: many clients push, pull, lock and meet at barriers for a while; nothing may be lost.

`--processes` x `--threads` clients (64 by default) run against 2 parameter-server
shards, a barrier server and a lock server for `--seconds`. Each client loops:
push a gradient of -1 to one of `--keys` keys (SGD with learning rate 1, so
every applied push adds exactly 1), pull a key, and every 10th iteration
acquire and release a shared lock. The threads of one process meet at a
barrier every 20 iterations. At the end every key must equal the number of
acknowledged pushes to it, with zero errors, and the servers' resident memory
may grow by less than 10% after the warm-up. The anchor is a raw gRPC bytes
echo of the gradient's size, from the same number of clients, in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections import Counter

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, serve, start, stop_all, table, wait_ready  # noqa: E402

from nanodist.client import BarrierClient, LockClient, ParameterServerClient, sgd  # noqa: E402
from nanodist.workers.progress import Progress  # noqa: E402

OPS = ["push", "pull", "lock", "barrier"]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def clients_progress(processes: int) -> Progress:
    """A bar on a terminal; off one (CI, a log file) a line as processes finish and at least every 10 s."""
    return Progress("soak:", processes, unit="client processes finished", every=10.0, stream=sys.stderr)


def client_process(index: int, addresses: dict[str, list[str]], args: argparse.Namespace, out: mp.Queue) -> None:
    acked: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {op: [] for op in OPS}
    errors: list[str] = []
    end = time.time() + args.seconds
    grad = np.full(args.elements, -1.0, np.float32)
    barrier_name = f"soak/process-{index}"
    lock = threading.Lock()

    def client(thread: int) -> None:
        rng = np.random.default_rng(index * 1000 + thread)
        ps = ParameterServerClient(addresses["ps"])
        locks = LockClient(addresses["lock"][0], f"soak-{index}-{thread}")
        barrier = BarrierClient(addresses["barrier"][0], f"soak-{index}-{thread}", barriers=[barrier_name])
        mine: dict[str, list[float]] = {op: [] for op in OPS}
        done: Counter[str] = Counter()
        try:
            i = 0
            while True:
                i += 1
                key = f"soak/{rng.integers(args.keys)}"
                begin = time.perf_counter()
                ps.push({key: grad})
                mine["push"].append(time.perf_counter() - begin)
                done[key] += 1
                begin = time.perf_counter()
                ps.pull([f"soak/{rng.integers(args.keys)}"])
                mine["pull"].append(time.perf_counter() - begin)
                if i % 10 == 0:
                    begin = time.perf_counter()
                    locks.release(locks.acquire("soak/shared", ttl=10, timeout=60))
                    mine["lock"].append(time.perf_counter() - begin)
                if i % 20 == 0:
                    # Every thread stops at the same iteration, so the barrier always fills.
                    begin = time.perf_counter()
                    barrier.wait(barrier_name, args.threads, timeout=60)
                    mine["barrier"].append(time.perf_counter() - begin)
                    if time.time() > end:
                        break
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            errors.append(f"{type(error).__name__}: {error}")
        finally:
            barrier.close()
            locks.close()
            ps.close()
        with lock:
            acked.update(done)
            for op in OPS:
                latencies[op].extend(mine[op])

    threads = [threading.Thread(target=client, args=(t,)) for t in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put((dict(acked), {op: np.array(v) for op, v in latencies.items()}, errors))


def echo_rate(address: str, clients: int, elements: int, seconds: float) -> float:
    """The anchor: round trips per second of the gradient's bytes through a raw gRPC echo."""
    blob = bytes(elements * 4)
    counts = [0] * clients
    end = time.time() + seconds

    def loop(i: int) -> None:
        with grpc.insecure_channel(address) as channel:
            echo = channel.unary_unary("/raw.Raw/Echo")
            while time.time() < end:
                echo(blob)
                counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8, help="clients per process")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=10.0, help="RSS growth is measured from this point")
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--elements", type=int, default=1024, help="float32 elements per key")
    parser.add_argument("--durability", default="none", choices=["none", "checkpoint", "wal"])
    args = parser.parse_args()

    raw_port = free_port()
    state = f"/tmp/nanodist-soak-{os.getpid()}"
    servers = {
        "raw": start([sys.executable, os.path.join(os.path.dirname(__file__), "raw_echo_server.py"), str(raw_port)])
    }
    bound: dict[str, str] = {}
    try:
        for name in ("ps0", "ps1"):
            durability = ["--checkpoint-dir", f"{state}/{name}"] if args.durability != "none" else []
            servers[name], bound[name] = serve("ps", "--durability", args.durability, *durability)
        for role in ("barrier", "lock"):
            servers[role], bound[role] = serve(role)
        wait_ready(f"127.0.0.1:{raw_port}")
        addresses = {"ps": [bound["ps0"], bound["ps1"]], "barrier": [bound["barrier"]], "lock": [bound["lock"]]}
        keys = [f"soak/{k}" for k in range(args.keys)]
        with ParameterServerClient(addresses["ps"]) as client:
            client.init({k: np.zeros(args.elements, np.float32) for k in keys}, sgd(1.0))
        clients = args.processes * args.threads
        anchor = echo_rate(f"127.0.0.1:{raw_port}", clients, args.elements, 5.0)
        out: mp.Queue = mp.Queue()
        began = time.time()
        procs = [mp.Process(target=client_process, args=(i, addresses, args, out)) for i in range(args.processes)]
        for proc in procs:
            proc.start()
        watched = {name: servers[name].pid for name in ("ps0", "ps1", "barrier", "lock")}
        rss_at_warmup: dict[str, float] = {}
        peak: Counter[str] = Counter()
        results = []
        progress = clients_progress(len(procs))
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=1.0))
                finished = 1
            except queue.Empty:  # sample memory and keep waiting
                finished = 0
            elapsed = time.time() - began
            for name, pid in watched.items():
                if servers[name].poll() is None:
                    now = rss_mib(pid)
                    peak[name] = max(peak[name], now)
                    if elapsed >= args.warmup and name not in rss_at_warmup:
                        rss_at_warmup[name] = now
            progress.update(finished, f"after {elapsed:.0f} s")
        progress.close()
        for proc in procs:
            proc.join()
        wall = time.time() - began
        rss_end = {name: rss_mib(pid) for name, pid in watched.items()}
        acked: Counter[str] = Counter()
        latencies: dict[str, list[np.ndarray]] = {op: [] for op in OPS}
        errors: list[str] = []
        for done, lat, errs in results:
            acked.update(done)
            for op in OPS:
                latencies[op].append(lat[op])
            errors.extend(errs)
        with ParameterServerClient(addresses["ps"]) as client:
            final = client.pull(keys)
        lost = [k for k in keys if final[k][0] != acked[k] or not np.all(final[k] == final[k][0])]
    finally:
        stop_all(list(servers.values()))
    rows = []
    for op in OPS:
        samples = np.concatenate(latencies[op]) if latencies[op] else np.zeros(0)
        if len(samples):
            p50, p99 = np.percentile(samples, [50, 99]) * 1000
            rows.append([op, len(samples), len(samples) / wall, p50, p99])
    print(f"{clients} clients for {wall:.0f}s against 2 shards, barrier and lock (durability {args.durability})")
    print(table(["op", "count", "ops/s", "p50 ms", "p99 ms"], rows))
    ps_rate = sum(len(np.concatenate(latencies[op])) for op in ("push", "pull")) / wall
    print(
        f"raw gRPC echo of {args.elements * 4} bytes, {clients} clients: {anchor:.0f} calls/s; "
        f"push + pull calls/s vs echo: {ps_rate / anchor:.2f}"
    )
    print(
        table(
            ["server", f"RSS at {args.warmup:g}s MiB", "end MiB", "peak MiB", "growth"],
            [
                [
                    n,
                    rss_at_warmup.get(n, 0.0),
                    rss_end[n],
                    peak[n],
                    f"{(rss_end[n] / rss_at_warmup[n] - 1) * 100:+.1f}%",
                ]
                for n in watched
                if n in rss_at_warmup
            ],
        )
    )
    growth_ok = all(rss_end[n] < rss_at_warmup[n] * 1.10 for n in rss_at_warmup)
    print(f"acknowledged pushes: {sum(acked.values())}; keys not equal to their acknowledged pushes: {len(lost)}")
    print(f"errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]))
    ok = not errors and not lost and growth_ok
    print("PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
