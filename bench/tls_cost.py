"""What TLS and tokens cost: push/pull throughput and small-call latency, as ratios to plaintext.

Three parameter servers run side by side: plaintext, TLS, and mutual TLS with a
bearer token. Calls alternate between them so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import serve, stop_all, table  # noqa: E402

from nanodist.client import ParameterServerClient, sgd  # noqa: E402
from nanodist.client.rpc import ClientSecurity  # noqa: E402
from nanodist.services.common import devcerts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as certs:
        ca = devcerts.make_ca(certs)
        devcerts.make_leaf(certs, "server", ca, ["localhost", "127.0.0.1"])
        devcerts.make_leaf(certs, "client", ca, [], client=True)
        devcerts.write_tokens(certs)
        path = lambda name: os.path.join(certs, name)  # noqa: E731
        tls = ["--tls-cert", path("server.pem"), "--tls-key", path("server-key.pem")]
        variants = {
            "plaintext": ([], ClientSecurity()),
            "TLS": (tls, ClientSecurity(ca=path("ca.pem"))),
            "mTLS + token": (
                [*tls, "--tls-client-ca", path("ca.pem"), "--auth-token-file", path("tokens")],
                ClientSecurity(
                    path("ca.pem"), path("client.pem"), path("client-key.pem"), token_file=path("worker.token")
                ),
            ),
        }
        servers: list[subprocess.Popen[bytes]] = []
        addresses: dict[str, str] = {}
        try:
            for name, (flags, _) in variants.items():
                server, addresses[name] = serve("ps", *flags)
                servers.append(server)
            clients = {n: ParameterServerClient([addresses[n]], security=s) for n, (_, s) in variants.items()}
            value = np.ones((args.mb << 20) // 4, np.float32)
            for client in clients.values():
                client.init({"w": value}, sgd(1e-9))
            samples: dict[str, dict[str, list[float]]] = {n: {"push": [], "pull": [], "call": []} for n in clients}
            for _ in range(args.rounds):
                for name, client in clients.items():
                    for kind, run in (
                        ("push", lambda c=client: c.push({"w": value})),
                        ("pull", lambda c=client: c.pull(["w"])),
                    ):
                        begin = time.perf_counter()
                        run()
                        samples[name][kind].append(time.perf_counter() - begin)
            for _ in range(args.calls):
                for name, client in clients.items():
                    begin = time.perf_counter()
                    client.stats()
                    samples[name]["call"].append(time.perf_counter() - begin)
        finally:
            stop_all(servers)
    base = {k: statistics.median(v) for k, v in samples["plaintext"].items()}
    rows = []
    for name, kinds in samples.items():
        med = {k: statistics.median(v) for k, v in kinds.items()}
        rows.append(
            [
                name,
                value.nbytes / med["push"] / 1e9,
                base["push"] / med["push"],
                value.nbytes / med["pull"] / 1e9,
                base["pull"] / med["pull"],
                med["call"] * 1e6,
                med["call"] / base["call"],
            ]
        )
    print(
        f"TLS cost on one shard: {args.mb} MiB push/pull (GB/s, throughput ÷ plaintext) and a small call "
        "(Stats, µs, latency ÷ plaintext)"
    )
    print(table(["variant", "push GB/s", "× plain", "pull GB/s", "× plain", "call µs", "× plain"], rows))


if __name__ == "__main__":
    main()
