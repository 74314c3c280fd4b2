"""nanodist.torch: train any torch.nn.Module through nanodist's worker groups and parameter servers.

The names follow Horovod's, so that a Horovod script switches by changing its import::

    import nanodist.torch as nd

    nd.init()
    model = Net()
    optimizer = nd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                        named_parameters=model.named_parameters())
    nd.broadcast_parameters(model.state_dict(), root_rank=0)
    nd.broadcast_optimizer_state(optimizer, root_rank=0)

Launch the script with `nanodist run --groups mpi:2,tcp:2 train.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

import nanodist.torch.broadcast as _broadcast
import nanodist.torch.collectives as _collectives
import nanodist.torch.elastic as elastic
import nanodist.torch.join as _join
import nanodist.torch.runtime as _runtime
from nanodist.torch.collectives import Op
from nanodist.torch.compression import Compression
from nanodist.torch.ddp import DistributedDataParallel
from nanodist.torch.embedding import Embedding, EmbeddingBag, normal, prefetch, uniform, zeros
from nanodist.torch.optimizer import DistributedOptimizer, ModelMismatch
from nanodist.torch.runtime import group_rank, group_size, init, job, local_rank, rank, shutdown, size


def broadcast_parameters(
    params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], root_rank: int = 0
) -> None:
    """Overwrite every worker's tensors (a state_dict or named_parameters) with root_rank's, in place."""
    current = job()
    if current is not None:
        _broadcast.broadcast_parameters(current, params, root_rank)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Give every worker root_rank's optimizer state (moments, step counts, learning rates)."""
    current = job()
    if current is not None:
        _broadcast.broadcast_optimizer_state(current, optimizer, root_rank)


Average, Sum, Min, Max = Op.AVERAGE, Op.SUM, Op.MIN, Op.MAX


def allreduce(tensor: torch.Tensor, op: Op = Average, name: str | None = None) -> torch.Tensor:
    """A new tensor: `tensor` combined over every rank (averaged by default), the same on every rank."""
    current = job()
    return tensor.detach().clone() if current is None else _collectives.allreduce(current, tensor, op, name)


def allgather(tensor: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Every rank's tensor concatenated along the first dimension, in rank order (first dims may differ)."""
    current = job()
    return tensor.detach().clone() if current is None else _collectives.allgather(current, tensor, name)


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """A new tensor holding root_rank's `tensor` (same shape and dtype on every rank)."""
    current = job()
    return tensor.detach().clone() if current is None else _collectives.broadcast(current, tensor, root_rank, name)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
    """Overwrite `tensor` with root_rank's, in place; returns it."""
    current = job()
    if current is not None:
        _collectives.broadcast_inplace(current, tensor, root_rank, name)
    return tensor


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """root_rank's `obj` on every rank: JSON values (dicts, lists, numbers, strings) and tensors or arrays,
    never pickled (see nanodist.torch.objects)."""
    current = job()
    return obj if current is None else _collectives.broadcast_object(current, obj, root_rank, name)


def allgather_object(obj: Any, name: str | None = None) -> list[Any]:
    """Every rank's `obj`, in rank order; the same values as broadcast_object can carry."""
    current = job()
    return [obj] if current is None else _collectives.allgather_object(current, obj, name)


def join() -> int:
    """Uneven data: a rank that has run out of batches calls this; it takes part in the others' steps with
    nothing to add until every rank has joined, and returns the rank that joined last (see nanodist.torch.join)."""
    current = job()
    return 0 if current is None else _join.join(current)


def synchronize(optimizer: torch.optim.Optimizer | None = None) -> None:
    """Wait for the communication in flight: the given optimizer's, or every DistributedOptimizer's."""
    if optimizer is None:
        _runtime.synchronize()
    else:
        getattr(optimizer, "synchronize", lambda: None)()


__all__ = [
    "Average",
    "Compression",
    "DistributedDataParallel",
    "DistributedOptimizer",
    "Embedding",
    "EmbeddingBag",
    "Max",
    "Min",
    "ModelMismatch",
    "Sum",
    "allgather",
    "allgather_object",
    "allreduce",
    "broadcast",
    "broadcast_",
    "broadcast_object",
    "broadcast_optimizer_state",
    "elastic",
    "broadcast_parameters",
    "group_rank",
    "group_size",
    "init",
    "join",
    "local_rank",
    "normal",
    "prefetch",
    "rank",
    "shutdown",
    "size",
    "synchronize",
    "uniform",
    "zeros",
]
