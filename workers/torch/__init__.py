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

import torch

import nanodist.torch.broadcast as _broadcast
import nanodist.torch.elastic as elastic
import nanodist.torch.runtime as _runtime
from nanodist.torch.compression import Compression
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


def synchronize(optimizer: torch.optim.Optimizer | None = None) -> None:
    """Wait for the communication in flight: the given optimizer's, or every DistributedOptimizer's."""
    if optimizer is None:
        _runtime.synchronize()
    else:
        getattr(optimizer, "synchronize", lambda: None)()


__all__ = [
    "Compression",
    "DistributedOptimizer",
    "Embedding",
    "EmbeddingBag",
    "ModelMismatch",
    "broadcast_optimizer_state",
    "elastic",
    "broadcast_parameters",
    "group_rank",
    "group_size",
    "init",
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
