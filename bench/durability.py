"""Push throughput under each durability mode, as a ratio to `none`, from concurrent clients.

One server per mode (none, checkpoint, wal) plus the raw gRPC bytes push
anchor, all started up front; `--clients` processes push `--mb` MiB dense
gradients to one server at a time for `--seconds`, and the servers take turns
for `--rounds` rounds so that machine noise hits every mode alike. wal fsyncs
each push before acknowledging it, sharing fsyncs between concurrent pushes
(group commit); the log lives in a temporary directory under --dir.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, serve, start, stop_all, table, wait_ready  # noqa: E402

from nanodist.client import ParameterServerClient, sgd  # noqa: E402

MODES = ["none", "checkpoint", "wal"]


def client_loop(address: str, raw: bool, kib: int, seconds: float, start_at: float, out: mp.Queue) -> None:
    payload = np.ones((kib << 10) // 4, dtype=np.float32)
    if raw:
        channel = grpc.insecure_channel(address)
        push_raw = channel.unary_unary("/raw.Raw/Push")
        blob = payload.tobytes()

        def push() -> None:
            push_raw(blob)
    else:
        client = ParameterServerClient([address])

        def push() -> None:
            client.push({f"w{kib}": payload})

    push()  # connect and warm up
    while time.time() < start_at:
        time.sleep(0.001)
    done = 0
    while time.time() < start_at + seconds:
        push()
        done += 1
    out.put(done)


def pushes_per_second(address: str, raw: bool, clients: int, kib: int, seconds: float) -> float:
    out: mp.Queue = mp.Queue()
    start_at = time.time() + 1.0  # every client connected before the clock starts
    procs = [mp.Process(target=client_loop, args=(address, raw, kib, seconds, start_at, out)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    total = sum(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def disk_mib_per_second(directory: str, kib: int, clients: int, seconds: float = 2.0) -> float:
    """The disk's anchor: appends of `clients` records per fsync, as group commit at best does them."""
    path = os.path.join(directory, "disk-anchor")
    block = os.urandom(kib << 10)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    written, begin = 0, time.perf_counter()
    try:
        while time.perf_counter() - begin < seconds:
            for _ in range(clients):
                os.write(fd, block)
            os.fsync(fd)
            written += clients * len(block)
    finally:
        os.close(fd)
        os.remove(path)
    return written / (time.perf_counter() - begin) / (1 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kib", type=int, nargs="+", default=[64, 1024], help="push sizes in KiB")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints and the log go (default: the temp dir)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="nanodist-durability-", dir=args.dir)
    raw_port = free_port()
    raw_server = os.path.join(os.path.dirname(__file__), "raw_echo_server.py")
    servers = [start([sys.executable, raw_server, str(raw_port)])]
    addresses = {"raw": f"127.0.0.1:{raw_port}"}
    rows = []
    try:
        for mode in MODES:
            extra = ["--checkpoint-dir", os.path.join(workdir, mode), "--checkpoint-interval", "5"]
            server, addresses[mode] = serve("ps", "--durability", mode, *(extra if mode != "none" else []))
            servers.append(server)
        wait_ready(addresses["raw"])
        for kib in args.kib:
            for name, address in addresses.items():
                if name != "raw":
                    with ParameterServerClient([address]) as client:
                        client.init({f"w{kib}": np.zeros((kib << 10) // 4, np.float32)}, sgd(1e-9))
            rates: dict[str, list[float]] = {name: [] for name in addresses}
            disk = []
            for round_ in range(args.rounds):
                for name, address in addresses.items():
                    rates[name].append(pushes_per_second(address, name == "raw", args.clients, kib, args.seconds))
                disk.append(disk_mib_per_second(workdir, kib, args.clients))
                print(f"  {kib} KiB: round {round_ + 1}/{args.rounds} done", file=sys.stderr)
            median = {name: statistics.median(r) for name, r in rates.items()}
            mib = {name: rate * kib / 1024 for name, rate in median.items()}
            mib["disk"] = statistics.median(disk)
            for name in [*addresses, "disk"]:
                rows.append(
                    [kib, name, mib[name] * 1024 / kib, mib[name], mib[name] / mib["none"], mib[name] / mib["raw"]]
                )
        with ParameterServerClient([addresses["wal"]]) as client:
            (stats,) = client.stats()
        group_commit = stats.wal_records / max(1, stats.wal_fsyncs)
    finally:
        stop_all(servers)
    print(
        f"push throughput, {args.clients} concurrent clients, medians of {args.rounds} rounds; "
        f"'disk' is fsynced appends of {args.clients} records at a time in {workdir}"
    )
    print(table(["KiB", "server", "pushes/s", "MiB/s", "vs none", "vs raw"], rows))
    print(f"wal group commit: {group_commit:.1f} records per fsync on average")


if __name__ == "__main__":
    main()
