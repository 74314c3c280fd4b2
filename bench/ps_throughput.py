"""Push and pull throughput of a parameter-server shard on each carrier, against the machine's anchors.

Anchors, measured in the same run: memcpy (np.copyto), a TCP socket between two
processes (bench/socket_sink.py: sendall / recv_into, no protocol), and raw gRPC
bytes (bench/raw_echo_server.py, identity serializers). The shard is pushed to
and pulled from, from this process, over plain gRPC (lanes off), the TCP lane
and the local (shared-memory) lane, and a replica set of --replicas shards (a primary whose every
push waits for its backups; over gRPC). Calls alternate within each round so that
machine noise hits all alike. Prints GB/s (medians) and each path's ratio to
the socket and to raw gRPC.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import MALLOC_ENV, replica_set, serve, start, stop_all, table, wait_ready  # noqa: E402

from nanodist.client import ParameterServerClient, sgd  # noqa: E402
from nanodist.ports import read_port_file  # noqa: E402

MAX = 1 << 30


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call, alternating the calls within each round."""
    for call in calls.values():
        call()  # warm up
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - begin)
    return {name: statistics.median(times) for name, times in samples.items()}


CARRIERS = {"gRPC": "off", "TCP lane": "tcp", "local lane": "on"}
FRAME = struct.Struct("<cQ")  # bench/socket_sink.py's frame


class SocketAnchor:
    """Pushes to and pulls from bench/socket_sink.py: the most a socket between two processes moves."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def push(self, data: memoryview) -> None:
        self.sock.sendall(FRAME.pack(b"P", len(data)))
        self.sock.sendall(data)
        self.sock.recv(1, socket.MSG_WAITALL)

    def pull(self, out: memoryview) -> None:
        self.sock.sendall(FRAME.pack(b"L", len(out)))
        got = 0
        while got < len(out):
            got += self.sock.recv_into(out[got:])


def measure(
    clients: dict[str, ParameterServerClient], channel: grpc.Channel, anchor: SocketAnchor, mb: int, rounds: int
) -> list[list[object]]:
    size = mb << 20
    payload = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    out = np.empty_like(payload)
    blob = payload.tobytes()
    key = f"bench/{mb}mb"
    for client in clients.values():  # one init per shard: the others find the key there
        client.init({key: payload}, sgd(1e-9))
    raw_push = channel.unary_unary("/raw.Raw/Push")
    raw_pull = channel.unary_unary("/raw.Raw/Pull")
    pull_request = str(size).encode()
    calls: dict[str, Callable[[], object]] = {
        "memcpy push": lambda: np.copyto(out, payload),
        "memcpy pull": lambda: np.copyto(out, payload),
        "socket push": lambda: anchor.push(payload.data.cast("B")),
        "socket pull": lambda: anchor.pull(out.data.cast("B")),
        "raw gRPC push": lambda: raw_push(blob),
        "raw gRPC pull": lambda: raw_pull(pull_request),
    }
    for name, client in clients.items():
        calls[f"{name} push"] = lambda c=client: c.push({key: payload})
        calls[f"{name} pull"] = lambda c=client: c.pull([key], out={key: out})
    rate = {name: size / t / 1e9 for name, t in interleaved(calls, rounds).items()}
    rows: list[list[object]] = []
    for path in ["memcpy", "socket", "raw gRPC", *clients]:
        push, pull = rate[f"{path} push"], rate[f"{path} pull"]
        socket_push, socket_pull = rate["socket push"], rate["socket pull"]
        raw_push_rate, raw_pull_rate = rate["raw gRPC push"], rate["raw gRPC pull"]
        rows.append(
            [mb, path, push, pull, push / socket_push, pull / socket_pull, push / raw_push_rate, pull / raw_pull_rate]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-malloc-env", action="store_true", help="run without the allocator settings")
    parser.add_argument("--replicas", type=int, default=2, help="also measure a replica set of this many (1: none)")
    args = parser.parse_args()
    env = {} if args.no_malloc_env else MALLOC_ENV
    if any(os.environ.get(k) != v for k, v in env.items()):
        # glibc reads these at start-up, so the client side needs a fresh process too.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})

    here = os.path.dirname(__file__)
    scratch = tempfile.mkdtemp(prefix="nanodist-bench-")
    raw_port_file, sink_port_file = os.path.join(scratch, "raw"), os.path.join(scratch, "sink")
    servers = [
        start([sys.executable, os.path.join(here, "raw_echo_server.py"), "0", raw_port_file], env),
        start([sys.executable, os.path.join(here, "socket_sink.py"), sink_port_file], env),
    ]
    try:
        ps, ps_address = serve("ps", "--mode", "asp", env=env)
        servers.append(ps)
        raw_port = read_port_file(raw_port_file, servers[0].poll, 30.0, "raw_echo_server.py")
        sink_port = read_port_file(sink_port_file, servers[1].poll, 30.0, "socket_sink.py")
        wait_ready(f"127.0.0.1:{raw_port}")
        options = [("grpc.max_send_message_length", MAX), ("grpc.max_receive_message_length", MAX)]
        channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=options)
        anchor = SocketAnchor(sink_port)
        clients = {name: ParameterServerClient([ps_address], lanes=lanes) for name, lanes in CARRIERS.items()}
        if args.replicas > 1:  # a replica set: every push waits for its backups (gRPC only, no lane)
            lock, lock_address = serve("lock", env=env)
            servers.append(lock)
            replicas, addresses = replica_set("bench", lock_address, args.replicas, env=env)
            servers += replicas
            clients[f"replica set k={args.replicas}"] = ParameterServerClient(["+".join(addresses)])
        rows = []
        for mb in args.sizes_mb:
            rounds = args.rounds if mb <= 64 else max(3, args.rounds // 3)
            rows += measure(clients, channel, anchor, mb, rounds)
            print(f"  measured {mb} MB", file=sys.stderr)
        print(f"one shard (ASP, SGD) from another process, GB/s; allocator env: {env or 'glibc default'}")
        headers = ["MB", "path", "push", "pull", "push/socket", "pull/socket", "push/raw gRPC", "pull/raw gRPC"]
        print(table(headers, rows))
        if args.replicas > 1:
            replicated = {row[0]: row for row in rows if str(row[1]).startswith("replica set")}
            plain = {row[0]: row for row in rows if row[1] == "gRPC"}
            for mb, row in replicated.items():
                print(
                    f"{mb} MB, replica set k={args.replicas} / one shard over gRPC (target >= 0.8): "
                    f"push {row[2] / plain[mb][2]:.2f}x, pull {row[3] / plain[mb][3]:.2f}x"
                )
    finally:
        stop_all(servers)


if __name__ == "__main__":
    main()
