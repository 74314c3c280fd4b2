"""A rank of the communication tests: python -m tests.integration.comm_ranks SCENARIO [BACKEND]

Backends come from the environment (mpiexec, or NANODIST_* for TCP; with
NANODIST_LOCK_ADDRESS the ranks meet in that lock service's key-value store).
Exits 0 when every check passes; on a CommError prints it and exits 3.
"""

import os
import sys

import numpy as np

from nanodist.client import KVStore
from nanodist.workers.comm import CommError, Communicator, ReduceOp, from_env

DTYPES = [np.float32, np.float64, np.int64]


def counts(dtype: type) -> list[int]:
    """Empty, smaller than the ranks, one chunk, and several chunks per ring segment with a ragged end
    (TCP chunks are 1 MiB, MPI's 2 MiB; a segment is 1/n of the array)."""
    itemsize = np.dtype(dtype).itemsize
    return [0, 1, 7, (1 << 20) // itemsize, (12 << 20) // itemsize + 5]


def value(rank: int, count: int, dtype: type) -> np.ndarray:
    return ((np.arange(count) * (rank + 3)) % 1000 + rank).astype(dtype)


def check_all(comm: Communicator) -> None:
    n = comm.size
    for dtype in DTYPES:
        for count in counts(dtype):
            inputs = [value(r, count, dtype) for r in range(n)]
            stacked = np.stack(inputs) if count else np.zeros((n, 0), dtype)
            ops = [ReduceOp.SUM, ReduceOp.MAX, ReduceOp.MIN] + ([ReduceOp.MEAN] if dtype != np.int64 else [])
            for op in ops:
                array = inputs[comm.rank].copy()
                comm.allreduce(array, op)
                expected = {
                    ReduceOp.SUM: stacked.sum(0),
                    ReduceOp.MAX: stacked.max(0),
                    ReduceOp.MIN: stacked.min(0),
                    ReduceOp.MEAN: stacked.sum(0) / n,
                }[op].astype(dtype)
                np.testing.assert_allclose(array, expected, rtol=1e-6, err_msg=f"{op} {dtype} {count}")
            for root in {0, n - 1}:
                array = inputs[comm.rank].copy()
                comm.broadcast(array, root)
                np.testing.assert_array_equal(array, inputs[root])
            np.testing.assert_array_equal(comm.allgather(inputs[comm.rank]), stacked)
    comm.barrier()
    matrix = value(comm.rank, 12, np.float64).reshape(3, 4)
    if comm.rank == 0:
        comm.send(matrix, 1)
    elif comm.rank == 1:
        received = np.empty((3, 4))
        comm.recv(received, 0)
        np.testing.assert_array_equal(received, value(0, 12, np.float64).reshape(3, 4))
    comm.barrier()


FIRST_JOB_RANK = 10  # as if this group came after others in a job: messages name the job's ranks


def loop_until_killed(comm: Communicator) -> None:
    comm.name_ranks(FIRST_JOB_RANK)
    array = np.ones((16 << 20) // 4, np.float32)
    print(f"looping {comm.rank}", flush=True)
    while True:
        comm.allreduce(array)


def mismatch(comm: Communicator) -> None:
    comm.allreduce(np.ones(10, np.float32 if comm.rank == 0 else np.float64))


def join(backend: str | None) -> Communicator:
    lock_address = os.environ.get("NANODIST_LOCK_ADDRESS")
    if not lock_address:
        return from_env(backend)
    with KVStore(lock_address) as store:  # needed only until every rank has published its address
        return from_env(backend, store=store)


def main() -> None:
    scenario = sys.argv[1]
    comm = join(sys.argv[2] if len(sys.argv) > 2 else None)
    try:
        {"all": check_all, "loop": loop_until_killed, "mismatch": mismatch}[scenario](comm)
    except CommError as error:
        print(f"CommError: {error}", flush=True)
        sys.exit(3)
    shm = "on" if getattr(comm, "shared_memory", False) else "off"
    print(
        f"rank {comm.rank} of {comm.size} ok ({type(comm).__name__}, shared memory {shm}, pid {os.getpid()})",
        flush=True,
    )
    comm.close()


if __name__ == "__main__":
    main()
