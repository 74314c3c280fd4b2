"""Push and pull throughput of the parameter server against a raw gRPC bytes anchor.

Both servers run as separate processes on 127.0.0.1 with the same allocator
settings; the client runs here. Calls alternate between the two so that
machine noise hits both alike. Prints GB/s (medians) and nanodist / raw.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import MALLOC_ENV, free_port, serve, start, stop_all, table, wait_ready  # noqa: E402

from nanodist.client import ParameterServerClient, sgd  # noqa: E402

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


def measure(client: ParameterServerClient, channel: grpc.Channel, mb: int, rounds: int) -> list[object]:
    size = mb << 20
    payload = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    blob = payload.tobytes()
    key = f"bench/{mb}mb"
    client.init({key: payload}, sgd(1e-9))
    raw_push = channel.unary_unary("/raw.Raw/Push")
    raw_pull = channel.unary_unary("/raw.Raw/Pull")
    pull_request = str(size).encode()
    seconds = interleaved(
        {
            "raw push": lambda: raw_push(blob),
            "ps push": lambda: client.push({key: payload}),
            "raw pull": lambda: raw_pull(pull_request),
            "ps pull": lambda: client.pull([key]),
        },
        rounds,
    )
    rate = {name: size / t / 1e9 for name, t in seconds.items()}
    return [
        mb,
        rate["raw push"],
        rate["ps push"],
        rate["ps push"] / rate["raw push"],
        rate["raw pull"],
        rate["ps pull"],
        rate["ps pull"] / rate["raw pull"],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-malloc-env", action="store_true", help="run without the allocator settings")
    args = parser.parse_args()
    env = {} if args.no_malloc_env else MALLOC_ENV
    if any(os.environ.get(k) != v for k, v in env.items()):
        # glibc reads these at start-up, so the client side needs a fresh process too.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})

    raw_port = free_port()
    raw_server = os.path.join(os.path.dirname(__file__), "raw_echo_server.py")
    servers = [start([sys.executable, raw_server, str(raw_port)], env)]
    try:
        ps, ps_address = serve("ps", "--mode", "asp", env=env)
        servers.append(ps)
        wait_ready(f"127.0.0.1:{raw_port}")
        options = [("grpc.max_send_message_length", MAX), ("grpc.max_receive_message_length", MAX)]
        channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=options)
        client = ParameterServerClient([ps_address])
        rows = []
        for mb in args.sizes_mb:
            rounds = args.rounds if mb <= 64 else max(3, args.rounds // 3)
            rows.append(measure(client, channel, mb, rounds))
            print(f"  measured {mb} MB", file=sys.stderr)
        print(f"parameter server (ASP, SGD) vs raw gRPC bytes, GB/s; allocator env: {env or 'glibc default'}")
        print(
            table(
                ["MB", "raw push", "ps push", "push ratio", "raw pull", "ps pull", "pull ratio"],
                rows,
            )
        )
    finally:
        stop_all(servers)


if __name__ == "__main__":
    main()
