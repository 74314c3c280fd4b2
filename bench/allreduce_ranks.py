"""One rank of an allreduce benchmark; rank 0 prints {MiB: median seconds} as JSON.

mpiexec -n K python allreduce_ranks.py mpi-raw|mpi-nanodist
python allreduce_ranks.py tcp RANK PEERS          (one process per rank)
python allreduce_ranks.py gloo RANK SIZE PORT     (one process per rank)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

SIZES_MIB = [int(s) for s in os.environ.get("BENCH_SIZES_MIB", "1,16,64").split(",")]
REPEATS = int(os.environ.get("BENCH_REPEATS", "10"))


def measure(allreduce: Callable[[np.ndarray], object], barrier: Callable[[], object], rank: int) -> None:
    results = {}
    for mib in SIZES_MIB:
        array = np.ones((mib << 20) // 4, dtype=np.float32)
        allreduce(array)
        times = []
        for _ in range(REPEATS):
            barrier()
            begin = time.perf_counter()
            allreduce(array)
            times.append(time.perf_counter() - begin)
        results[mib] = statistics.median(times)
    if rank == 0:
        print(json.dumps(results), flush=True)


def main() -> None:
    mode = sys.argv[1]
    if mode == "mpi-raw":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        out: dict[int, np.ndarray] = {}

        def raw(array: np.ndarray) -> None:
            # What a user writes first: separate receive buffer, one call.
            recv = out.get(array.size)
            if recv is None:
                recv = out[array.size] = np.empty_like(array)
            comm.Allreduce(array, recv)

        measure(raw, comm.Barrier, comm.rank)
    elif mode == "mpi-nanodist":
        from nanodist.workers.comm.mpi import MPICommunicator

        comm = MPICommunicator()
        measure(comm.allreduce, comm.barrier, comm.rank)
    elif mode == "tcp":
        from nanodist.workers.comm.rendezvous import via_peers

        comm = via_peers(sys.argv[3].split(","), int(sys.argv[2]))
        measure(comm.allreduce, comm.barrier, comm.rank)
        comm.close()
    elif mode == "gloo":
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        rank, size, port = (int(a) for a in sys.argv[2:5])
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=120),
        )
        measure(lambda a: dist.all_reduce(torch.from_numpy(a)), dist.barrier, rank)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
