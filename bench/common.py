"""Helpers shared by the benchmarks: free ports, server processes, timing, tables."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc

from nanodist.ports import read_port_file

# Allocator settings measured to help large messages (see docs/benchmarks.md):
# keep big buffers out of fresh mmap pages and stop glibc trimming them away.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def nanodist(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return start([sys.executable, "-m", "nanodist.workers.cli", *args], env)


def serve(role: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`nanodist serve ROLE ARGS...` on a port it binds itself; the process and its address, once it serves.

    free_port() races (its port is free only until the socket closes), so a server's port comes from
    its --port-file instead. The server writes the file after it reports SERVING.
    """
    with tempfile.TemporaryDirectory(prefix="nanodist-bench-") as scratch:
        port_file = os.path.join(scratch, "port")
        process = nanodist("serve", role, "--port", "0", "--port-file", port_file, *args, env=env)
        try:
            port = read_port_file(port_file, process.poll, timeout=30.0, name=f"nanodist serve {role}")
        except BaseException:
            process.kill()
            process.wait()
            raise
    return process, f"127.0.0.1:{port}"


def replica_set(
    name: str, coordinator: str, replicas: int = 2, *args: str, env: dict[str, str] | None = None
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """`replicas` shards of replica set `name`; their processes and addresses once one is primary
    with every other in sync behind it."""
    started = [
        serve("ps", "--replica-set", name, "--coordinator", coordinator, *args, env=env) for _ in range(replicas)
    ]
    addresses = [address for _, address in started]
    deadline = time.monotonic() + 60
    while primary_of(addresses, in_sync=replicas - 1) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replica set {name}: no primary with {replicas - 1} backups in sync within 60 s")
        time.sleep(0.05)
    return [process for process, _ in started], addresses


def primary_of(addresses: list[str], in_sync: int = 0) -> str | None:
    """The replica of `addresses` that is primary with at least `in_sync` backups in sync, if any."""
    from nanodist.v1 import parameter_server_pb2 as ps
    from nanodist.v1 import parameter_server_pb2_grpc

    for address in addresses:
        try:
            with grpc.insecure_channel(address) as channel:
                stub = parameter_server_pb2_grpc.ParameterServerStub(channel)
                replicas = stub.Stats(ps.StatsRequest(), timeout=2).replicas
        except grpc.RpcError:
            continue
        if replicas.role == "primary" and sum(f.in_sync for f in replicas.followers) >= in_sync:
            return address
    return None


def wait_ready(address: str, timeout: float = 30.0) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)


def median_us(run: Callable[[], object], repeats: int, warmup: int = 50) -> float:
    """Median wall time of one call, in microseconds, after `warmup` untimed calls."""
    for _ in range(min(warmup, repeats)):
        run()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e6


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait()


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [
        headers,
        *[[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows],
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def last_json(output: str) -> dict[str, Any]:
    """The last JSON object printed in `output` (a rank's result line, after any prefix)."""
    for line in reversed(output.splitlines()):
        if "{" in line:
            return json.loads(line[line.index("{") :])
    raise RuntimeError(f"no result in:\n{output[-3000:]}")


def ddp_ranks(script: str, args: list[str], world: int = 4) -> dict[str, Any]:
    """Run `script ARGS... RANK WORLD PORT` as `world` torch.distributed processes; rank 0's JSON result."""
    port = str(free_port())
    ranks = [
        subprocess.Popen([sys.executable, script, *args, str(r), str(world), port], stdout=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    outputs = [p.communicate()[0] for p in ranks]
    if any(p.returncode for p in ranks):
        raise RuntimeError(f"a DDP rank failed: {outputs}")
    return last_json(outputs[0])


def nanodist_run(args: list[str]) -> dict[str, Any]:
    """`nanodist run ARGS...` to the end; the JSON result its rank 0 printed."""
    command = [sys.executable, "-m", "nanodist.workers.cli", "run", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-3000:])
    return last_json(result.stdout)


def start_etcd(directory: str, members: int = 3) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """A local etcd cluster of Debian's etcd-server (`make etcd`): its processes and client endpoints,
    once every member reports healthy."""
    ports = [(free_port(), free_port()) for _ in range(members)]
    cluster = ",".join(f"m{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    processes = []
    for i, (client, peer) in enumerate(ports):
        urls = {"client": f"http://127.0.0.1:{client}", "peer": f"http://127.0.0.1:{peer}"}
        command = ["etcd", f"--name=m{i}", f"--data-dir={directory}/m{i}", f"--initial-cluster={cluster}",
                   f"--listen-client-urls={urls['client']}", f"--advertise-client-urls={urls['client']}",
                   f"--listen-peer-urls={urls['peer']}", f"--initial-advertise-peer-urls={urls['peer']}",
                   "--logger=zap", "--log-level=error"]  # fmt: skip
        processes.append(start(command))
    endpoints = [f"127.0.0.1:{client}" for client, _ in ports]
    deadline = time.monotonic() + 60
    for endpoint in endpoints:
        while True:
            try:
                with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as answer:
                    if b'"true"' in answer.read():
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd at {endpoint} not healthy within 60 s") from None
                time.sleep(0.2)
    return processes, endpoints
