"""`nanodist comm-check`: run each collective against a numpy reference and print bandwidth."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np

from nanodist.workers.comm.base import CommError, Communicator, ReduceOp
from nanodist.workers.comm.factory import detect_backend, from_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["tcp", "mpi"], required=True)
    parser.add_argument(
        "--nprocs",
        type=int,
        default=2,
        help="launch this many local ranks (mpiexec for mpi, static peers for tcp) unless already inside a group",
    )
    parser.add_argument("--size-mb", type=int, default=16, help="allreduce size for the bandwidth figure")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: argparse.Namespace) -> int:
    command = [
        sys.executable,
        "-m",
        "nanodist.workers.cli",
        "comm-check",
        "--backend",
        args.backend,
        "--size-mb",
        str(args.size_mb),
    ]
    if args.backend == "mpi":
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or "mpiexec"
        return subprocess.call([mpiexec, "-n", str(args.nprocs), *command])
    peers = ",".join(f"127.0.0.1:{_free_port()}" for _ in range(args.nprocs))
    procs = [
        subprocess.Popen(command, env={**os.environ, "NANODIST_PEERS": peers, "NANODIST_RANK": str(r)})
        for r in range(args.nprocs)
    ]
    return max(p.wait() for p in procs)


def _check(comm: Communicator, size_mb: int) -> None:
    rng = np.random.default_rng(comm.rank)
    mine = rng.standard_normal(1000).astype(np.float32)
    everyone = comm.allgather(mine)
    expected = everyone.sum(0)
    reduced = mine.copy()
    comm.allreduce(reduced, ReduceOp.SUM)
    np.testing.assert_allclose(reduced, expected, rtol=1e-5)
    root = comm.size - 1
    copy = mine.copy()
    comm.broadcast(copy, root)
    np.testing.assert_array_equal(copy, everyone[root])
    array = np.ones((size_mb << 20) // 4, np.float32)
    comm.allreduce(array)
    times = []
    for _ in range(5):
        comm.barrier()
        begin = time.perf_counter()
        comm.allreduce(array)
        times.append(time.perf_counter() - begin)
    best = min(times)
    if comm.rank == 0:
        transport = " over same-host shared memory" if getattr(comm, "shared_memory", False) else ""
        print(
            f"{type(comm).__name__}{transport}, {comm.size} ranks: allgather, allreduce and broadcast match numpy; "
            f"allreduce of {size_mb} MiB float32 in {best * 1e3:.1f} ms = {array.nbytes / best / 1e9:.2f} GB/s",
            flush=True,
        )


def run(args: argparse.Namespace) -> None:
    inside = detect_backend() != "single"
    if not inside:
        raise SystemExit(_launch(args))
    try:
        with from_env(args.backend) as comm:
            _check(comm, args.size_mb)
    except (CommError, AssertionError) as error:
        print(f"comm-check failed: {error}", file=sys.stderr)
        raise SystemExit(1) from None
