"""Collective communication inside a worker group: MPI (mpi4py) or TCP ring backends."""

from nanodist.workers.comm.base import CommError, Communicator, ReduceOp, SendHandle, SingleProcess
from nanodist.workers.comm.factory import from_env
from nanodist.workers.comm.rendezvous import RendezvousStore

__all__ = ["CommError", "Communicator", "ReduceOp", "RendezvousStore", "SendHandle", "SingleProcess", "from_env"]
