"""Collective communication inside a worker group: MPI (mpi4py) or TCP ring backends."""

from nanodist.workers.comm.base import CommError, Communicator, ReduceOp, SendHandle, SingleProcess
from nanodist.workers.comm.factory import from_env

__all__ = ["CommError", "Communicator", "ReduceOp", "SendHandle", "SingleProcess", "from_env"]
