"""MPI backend over mpi4py, using only the buffer (upper-case) methods: nothing is pickled.

Large allreduces run in place over 2 MiB pieces: MPICH allocates a fresh
temporary for each call, and on these machines a whole 64 MiB call spends most
of its time faulting those pages in (see bench/allreduce.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from nanodist.workers.comm.base import CommError, Communicator, ReduceOp, SendHandle, check_array, signature

if TYPE_CHECKING:
    from mpi4py import MPI

CHUNK_BYTES = 2 << 20
ABORT_GRACE_S = 0.5
_OPCODES = {"allreduce": 1, "broadcast": 2, "allgather": 3}


class MPICommunicator(Communicator):
    def __init__(self, comm: MPI.Intracomm | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        # Imported here, not at the top: importing mpi4py.MPI initialises MPI, which only a
        # process that chose the MPI backend (under mpiexec) should do.
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.chunk_bytes = chunk_bytes
        self._ops = {
            ReduceOp.SUM: MPI.SUM,
            ReduceOp.MEAN: MPI.SUM,
            ReduceOp.MAX: MPI.MAX,
            ReduceOp.MIN: MPI.MIN,
        }
        self._sig = np.empty(6, dtype=np.int64)
        self._first_job_rank = 0  # see name_ranks

    def name_ranks(self, first: int) -> None:
        self._first_job_rank = first

    def _name(self, rank: int) -> str:
        return f"rank {self._first_job_rank + rank}"

    def _agree(self, name: str, array: np.ndarray) -> None:
        """Check with one tiny Allreduce that all ranks call the same collective on the same data."""
        if self.size == 1:
            return
        sig = signature(array, _OPCODES[name])
        self._sig[:3] = sig
        self._sig[3:] = [-v for v in sig]
        mine = self._sig.copy()
        self._wait_yielding(self.comm.Iallreduce(self.MPI.IN_PLACE, self._sig, op=self.MPI.MAX))
        if not np.array_equal(self._sig, mine):
            raise CommError(
                f"{self._name(self.rank)}: ranks disagree on {name}: this rank has "
                f"{array.dtype.name}[{array.size}], another has (op, dtype, count) in "
                f"{self._sig[:3].tolist()}..{(-self._sig[3:]).tolist()}"
            )

    @staticmethod
    def _wait_yielding(request: MPI.Request) -> None:
        """Wait for a request without pinning a core.

        MPICH busy-polls inside blocking calls. This check is where a rank
        waits for slower peers (a group leader talking to the parameter
        server, say), and on a small machine a spinning rank steals the CPU
        those peers need; so spin briefly, then sleep between tests.
        """
        spin_until = time.perf_counter() + 200e-6
        pause = 50e-6
        while not request.Test():
            if time.perf_counter() > spin_until:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    def allreduce(self, array: np.ndarray, op: ReduceOp = ReduceOp.SUM) -> np.ndarray:
        flat = check_array(array, op)
        self._agree("allreduce", flat)
        step = max(1, self.chunk_bytes // flat.itemsize)
        for start in range(0, flat.size, step):
            self.comm.Allreduce(self.MPI.IN_PLACE, flat[start : start + step], op=self._ops[op])
        if op is ReduceOp.MEAN:
            np.divide(flat, self.size, out=flat)
        return array

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        flat = check_array(array)
        self._agree("broadcast", flat)
        step = max(1, self.chunk_bytes // flat.itemsize)
        for start in range(0, flat.size, step):
            self.comm.Bcast(flat[start : start + step], root=root)
        return array

    def allgather(self, array: np.ndarray) -> np.ndarray:
        flat = check_array(np.ascontiguousarray(array))
        self._agree("allgather", flat)
        out = np.empty((self.size, *array.shape), dtype=array.dtype)
        self.comm.Allgather(flat, out.reshape(self.size, -1))
        return out

    def abort(self) -> None:
        # A rank that merely exits leaves the others blocked in their next collective. mpiexec forwards
        # the ranks' output asynchronously and drops what it holds when the job aborts, so give it a
        # moment: the error printed just before is the only account of why the job stopped.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(1)

    def barrier(self) -> None:
        self.comm.Barrier()

    def send(self, array: np.ndarray, dest: int) -> None:
        self.comm.Send(check_array(np.ascontiguousarray(array)), dest=dest)

    def isend(self, array: np.ndarray, dest: int) -> SendHandle:
        buffer = check_array(np.ascontiguousarray(array))
        return _Pending(self.comm.Isend(buffer, dest=dest), buffer)

    def recv(self, array: np.ndarray, source: int) -> np.ndarray:
        flat = check_array(array)
        status = self.MPI.Status()
        try:
            self.comm.Recv(flat, source=source, status=status)
        except self.MPI.Exception as error:
            raise CommError(f"{self._name(self.rank)}: receive from {self._name(source)} failed: {error}") from None
        if status.Get_count(self.MPI.BYTE) != flat.nbytes:
            raise CommError(
                f"{self._name(self.rank)}: received {status.Get_count(self.MPI.BYTE)} bytes from "
                f"{self._name(source)}, expected {flat.nbytes}"
            )
        return array


class _Pending:
    def __init__(self, request: MPI.Request, buffer: np.ndarray) -> None:
        self.request, self.buffer = request, buffer  # MPI reads the buffer until the request completes

    def wait(self) -> None:
        self.request.Wait()
