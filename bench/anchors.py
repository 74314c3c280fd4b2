"""Anchor measurements run in their own processes; each prints one median in µs.

mpiexec -n 2 python anchors.py mpi-barrier
python anchors.py gloo-barrier      (spawns 2 ranks)
python anchors.py tcpstore-add
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_us  # noqa: E402


def mpi_barrier() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    us = median_us(comm.Barrier, 5000, warmup=100)
    if comm.rank == 0:
        print(us)


def _gloo_rank(rank: int, port: int, queue) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    us = median_us(dist.barrier, 1000, warmup=100)
    if rank == 0:
        queue.put(us)
    dist.destroy_process_group()


def gloo_barrier() -> None:
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    print(queue.get(timeout=240))
    for p in procs:
        p.join()


def tcpstore_add() -> None:
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30))
    print(median_us(lambda: store.add("counter", 1), 2000, warmup=100))


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    {"mpi-barrier": mpi_barrier, "gloo-barrier": gloo_barrier, "tcpstore-add": tcpstore_add}[sys.argv[1]]()
