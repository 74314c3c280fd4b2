"""Horovod's collectives on a user's own tensors and objects: metrics, small tensors, a scheduler's state.

Gradients go through DistributedOptimizer's buckets; these are for what a
script exchanges now and then. Inside a group a tensor travels over MPI or
TCP; between groups the group leaders exchange it through the job's
key-value store, which also carries objects. Every call runs on the job's
collectives thread, after any gradient bucket already queued there, since a
group's collectives must start in the same order on every rank.

Each call has a name, the same on every rank: the n-th call of the script
unless `name=` says otherwise (a worker that joins an elastic job late has
made fewer calls, so elastic scripts name theirs).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch

from nanodist.torch import objects
from nanodist.torch.broadcast import broadcast_tensors
from nanodist.workers.comm import ReduceOp
from nanodist.workers.job import Job

T = TypeVar("T")

_calls = itertools.count()


class Op(Enum):
    """How nd.allreduce combines the ranks' tensors (Horovod's hvd.Average, hvd.Sum, hvd.Min, hvd.Max)."""

    AVERAGE = "average"
    SUM = "sum"
    MIN = "min"
    MAX = "max"


_GROUP_OP = {Op.AVERAGE: ReduceOp.SUM, Op.SUM: ReduceOp.SUM, Op.MIN: ReduceOp.MIN, Op.MAX: ReduceOp.MAX}
_COMBINE: dict[Op, Callable[..., Any]] = {Op.AVERAGE: np.add, Op.SUM: np.add, Op.MIN: np.minimum, Op.MAX: np.maximum}


def call_name(job: Job, kind: str, name: str | None) -> str:
    suffix = f"gen-{job.generation}/" if job.config.elastic else ""
    return f"{job.config.run_id}/torch/{kind}/{suffix}{name if name is not None else next(_calls)}"


def on_comm_thread(job: Job, work: Callable[[], T]) -> T:
    """Run `work` after the collectives already queued (a step's buckets), never beside them."""
    return job.collectives().submit(work).result()


def allreduce(job: Job, tensor: torch.Tensor, op: Op, name: str | None) -> torch.Tensor:
    if op is Op.AVERAGE and not tensor.is_floating_point():
        raise ValueError(f"nd.Average needs a floating-point tensor, got {tensor.dtype}; use nd.Sum")
    key = call_name(job, "allreduce", name)
    # bfloat16 is summed in float32: numpy's files cannot hold it, and the sum loses less.
    working = torch.float32 if tensor.dtype == torch.bfloat16 else tensor.dtype
    result = tensor.detach().to("cpu", working, copy=True).contiguous()
    array = result.numpy().reshape(-1)

    def run() -> None:
        if job.comm.size > 1:
            job.comm.allreduce(array, _GROUP_OP[op])
        if len(job.group_sizes) > 1:
            if job.is_leader:
                totals = exchange(job, key, job.group_index, len(job.group_sizes), _to_bytes(array))
                combined = _from_bytes(totals[0])
                for other in totals[1:]:  # the same order on every leader: the same result
                    _COMBINE[op](combined, _from_bytes(other), out=combined)
                array[:] = combined
            if job.comm.size > 1:
                job.comm.broadcast(array, root=0)

    on_comm_thread(job, run)
    if op is Op.AVERAGE:
        result /= job.world
    return result.to(tensor.device, tensor.dtype)


def allgather(job: Job, tensor: torch.Tensor, name: str | None) -> torch.Tensor:
    """Every rank's tensor concatenated along the first dimension, in rank order (first dims may differ)."""
    local = tensor.detach().cpu().contiguous()
    if local.dim() == 0:
        raise ValueError("nd.allgather concatenates along the first dimension: give it a tensor of 1 or more dims")
    parts = allgather_object(job, local, name, kind="allgather")
    return torch.cat(parts).to(tensor.device)


def broadcast(job: Job, tensor: torch.Tensor, root_rank: int, name: str | None) -> torch.Tensor:
    result = tensor.detach().clone()
    broadcast_inplace(job, result, root_rank, name)
    return result


def broadcast_inplace(job: Job, tensor: torch.Tensor, root_rank: int, name: str | None) -> None:
    key = call_name(job, "broadcast", name)
    on_comm_thread(job, lambda: broadcast_tensors(job, [tensor], root_rank, key))


def broadcast_object(job: Job, value: Any, root_rank: int, name: str | None) -> Any:
    if not 0 <= root_rank < job.world:
        raise ValueError(f"root_rank {root_rank} is outside [0, {job.world})")
    data = objects.encode(value) if job.rank == root_rank else None  # refused before the call takes a name
    key = call_name(job, "broadcast-object", name)
    (data,) = exchange(job, key, job.rank, job.world, data, only=root_rank)
    return value if job.rank == root_rank else objects.decode(data)


def allgather_object(job: Job, value: Any, name: str | None, kind: str = "allgather-object") -> list[Any]:
    mine = objects.encode(value)
    key = call_name(job, kind, name)
    return [
        value if r == job.rank else objects.decode(d)
        for r, d in enumerate(exchange(job, key, job.rank, job.world, mine))
    ]


def exchange(job: Job, key: str, me: int, parties: int, data: bytes | None, only: int | None = None) -> list[bytes]:
    """Through the key-value store: each of `parties` posts `data` under its index (or only `only` does),
    and every party reads what was posted. The last reader removes the keys, so the store does not grow."""
    kv, timeout = job.kv, job.config.timeout
    senders = [only] if only is not None else list(range(parties))
    if data is not None:
        kv.set(f"{key}/{me}", data)
    kv.wait([f"{key}/{s}" for s in senders], timeout=timeout)
    posted = [kv.get(f"{key}/{s}") for s in senders]
    if kv.add(f"{key}/read", 1) == parties:
        for s in senders:
            kv.delete_key(f"{key}/{s}")
        kv.delete_key(f"{key}/read")
    return posted


def _to_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
