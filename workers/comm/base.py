"""The Communicator interface shared by the MPI and TCP backends."""

from __future__ import annotations

import abc
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

import numpy as np

from nanodist.wire.codec import proto_dtype


class ReduceOp(StrEnum):
    SUM = "sum"
    MEAN = "mean"
    MAX = "max"
    MIN = "min"


class CommError(RuntimeError):
    """A collective failed: a peer died or hung, a rendezvous did not complete, or ranks disagree."""


# Elementwise reductions used by the TCP backend, in place into the first argument.
UFUNCS = {
    ReduceOp.SUM: np.add,
    ReduceOp.MEAN: np.add,
    ReduceOp.MAX: np.maximum,
    ReduceOp.MIN: np.minimum,
}


def check_array(array: np.ndarray, op: ReduceOp | None = None) -> np.ndarray:
    """A flat writable view of a C-contiguous array of a supported dtype."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"collectives work in place on numpy arrays, got {type(array).__name__}")
    proto_dtype(array.dtype)
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError("collectives need a C-contiguous, writable array")
    if op is ReduceOp.MEAN and array.dtype.kind != "f":
        raise ValueError(f"MEAN needs a floating-point array, got {array.dtype.name}")
    return array.reshape(-1)


def signature(array: np.ndarray, opcode: int) -> tuple[int, int, int]:
    """What every rank must agree on for one collective: operation, dtype, element count."""
    return opcode, proto_dtype(array.dtype), array.size


class SendHandle(Protocol):
    def wait(self) -> None:
        """Return once the send is complete and its buffer may be reused; raises CommError on failure."""


class _Done:
    def wait(self) -> None:
        return None


# Says why the group cannot go on (a member is gone), or None; it may raise to stop this rank itself.
Watch = Callable[[], str | None]


class Communicator(abc.ABC):
    """A group of `size` processes; this one is `rank`. Collectives run in place on numpy arrays.

    Build one with nanodist.workers.comm.from_env(), which picks the backend.
    """

    rank: int
    size: int

    @abc.abstractmethod
    def allreduce(self, array: np.ndarray, op: ReduceOp = ReduceOp.SUM) -> np.ndarray:
        """Reduce `array` across ranks, in place; every rank ends with the result. Returns `array`."""

    @abc.abstractmethod
    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Copy root's `array` into every rank's `array`, in place."""

    @abc.abstractmethod
    def allgather(self, array: np.ndarray) -> np.ndarray:
        """A new array of shape (size, *array.shape): row r is rank r's `array`."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""

    @abc.abstractmethod
    def send(self, array: np.ndarray, dest: int) -> None:
        """Send `array` to rank `dest` (blocking until handed to the transport)."""

    @abc.abstractmethod
    def recv(self, array: np.ndarray, source: int) -> np.ndarray:
        """Receive into `array` from rank `source`; shape and dtype must match what was sent."""

    def isend(self, array: np.ndarray, dest: int) -> SendHandle:
        """Start sending `array` to `dest` and return at once; keep `array` unchanged until wait().

        Two ranks that send to each other at the same time must use this: with
        blocking sends of large messages each would wait for the other to receive.
        """
        self.send(array, dest)
        return _Done()

    def watch(self, probe: Watch) -> None:  # noqa: B027 - only backends that can wait on a silent peer need it
        """Call `probe` every half second or so while waiting for a peer; a message it returns fails the wait.

        A peer that dies closes its sockets, but a frozen or partitioned one says
        nothing: the probe lets a wait learn of its loss from elsewhere (the job's
        barrier leases) instead of waiting out the whole timeout.
        """

    def name_ranks(self, first: int) -> None:  # noqa: B027 - only backends whose messages name peers need it
        """This group's rank 0 is the job's rank `first`: messages name ranks as the job numbers them."""

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release sockets or other resources."""

    def abort(self) -> None:  # noqa: B027 - only MPI needs more than process exit
        """Bring down the whole group after a fatal error, so no peer waits for this rank."""

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SingleProcess(Communicator):
    """size 1: every collective is a no-op (or a copy), so code runs unchanged without a group."""

    rank, size = 0, 1

    def allreduce(self, array: np.ndarray, op: ReduceOp = ReduceOp.SUM) -> np.ndarray:
        check_array(array, op)
        return array

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        if root != 0:
            raise ValueError(f"root {root} is not a rank of a group of size 1")
        return array

    def allgather(self, array: np.ndarray) -> np.ndarray:
        return np.array(array)[None, ...]

    def barrier(self) -> None:
        return None

    def send(self, array: np.ndarray, dest: int) -> None:
        raise CommError("send needs a group of at least 2 ranks")

    def recv(self, array: np.ndarray, source: int) -> np.ndarray:
        raise CommError("recv needs a group of at least 2 ranks")
