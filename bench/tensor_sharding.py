"""Push + pull of one large parameter split by rows over 2 shards, against the same parameter on one shard.

Two shard processes and the raw gRPC bytes anchor run side by side; the split
client and the unsplit client (split_bytes=0, so the key lives on one shard)
take turns within each round. Prints median milliseconds and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, serve, start, stop_all, table, wait_ready  # noqa: E402

from nanodist.client import ParameterServerClient, sgd  # noqa: E402

MAX = 1 << 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    raw_port = free_port()
    raw_server = os.path.join(os.path.dirname(__file__), "raw_echo_server.py")
    servers = [start([sys.executable, raw_server, str(raw_port)])]
    rows = []
    try:
        addresses = []
        for _ in range(2):
            shard, address = serve("ps")
            servers.append(shard)
            addresses.append(address)
        wait_ready(f"127.0.0.1:{raw_port}")
        split = ParameterServerClient(addresses)
        whole = ParameterServerClient(addresses, split_bytes=0)
        options = [("grpc.max_send_message_length", MAX), ("grpc.max_receive_message_length", MAX)]
        channel = grpc.insecure_channel(f"127.0.0.1:{raw_port}", options=options)
        raw_push, raw_pull = channel.unary_unary("/raw.Raw/Push"), channel.unary_unary("/raw.Raw/Pull")
        for mb in args.mb:
            side = int(np.sqrt((mb << 20) // 4))
            value = np.random.default_rng(0).random((side, side), dtype=np.float32)
            split.init({f"split{mb}": value}, sgd(1e-9))
            whole.init({f"whole{mb}": value}, sgd(1e-9))
            blob = value.tobytes()
            calls = {
                "raw": lambda b=blob: (raw_push(b), raw_pull(str(len(b)).encode())),
                "one shard": lambda k=f"whole{mb}", v=value: (whole.push({k: v}), whole.pull([k])),
                "split over 2": lambda k=f"split{mb}", v=value: (split.push({k: v}), split.pull([k])),
            }
            samples: dict[str, list[float]] = {name: [] for name in calls}
            for call in calls.values():
                call()  # warm up
            for _ in range(args.rounds):
                for name, call in calls.items():
                    begin = time.perf_counter()
                    call()
                    samples[name].append(time.perf_counter() - begin)
            ms = {name: statistics.median(t) * 1000 for name, t in samples.items()}
            rows.append([mb, ms["raw"], ms["one shard"], ms["split over 2"], ms["one shard"] / ms["split over 2"]])
            print(f"  measured {mb} MB", file=sys.stderr)
        split.close()
        whole.close()
    finally:
        stop_all(servers)
    print("push + pull of one parameter, median ms; speed-up = one shard / split over 2 shards")
    print(table(["MB", "raw gRPC", "one shard", "split over 2", "speed-up"], rows))


if __name__ == "__main__":
    main()
