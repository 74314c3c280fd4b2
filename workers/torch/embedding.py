"""nd.Embedding and nd.EmbeddingBag: tables that live on the parameter servers, never whole on a worker.

Each is a torch.nn.Module with no torch Parameter: the table is split by rows
across every shard, and a forward pulls only the unique rows of its batch.
The servers apply the table's optimizer row by row to the rows a step's
gradients touch (see nanodist.torch.rows for when they are pushed).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import nanodist.torch.runtime as runtime
from nanodist.client import sgd
from nanodist.row_init import NORMAL, UNIFORM, ZEROS
from nanodist.torch.rows import RowExchange, RowGradient
from nanodist.v1 import parameter_server_pb2 as ps

_exchange: RowExchange | None = None


def exchange() -> RowExchange:
    """The process's RowExchange, created on first use."""
    global _exchange
    job = runtime.job()
    if job is None:
        raise RuntimeError(
            "nd.Embedding and nd.EmbeddingBag keep their tables on parameter servers: start the script with "
            "`nanodist run` (for one worker: nanodist run --groups tcp:1 script.py)"
        )
    if _exchange is None or _exchange.job is not job:
        _exchange = RowExchange(job)
        runtime.on_shutdown(_close)
        runtime.register(_exchange)
    return _exchange


def _close() -> None:
    global _exchange
    if _exchange is not None:
        _exchange.close()
        _exchange = None


def normal(std: float = 1.0, seed: int = 0) -> ps.RowInitializer:
    """Rows start from N(0, std^2), as torch.nn.Embedding's (std 1)."""
    return ps.RowInitializer(kind=NORMAL, scale=std, seed=seed)  # type: ignore[arg-type]


def uniform(scale: float, seed: int = 0) -> ps.RowInitializer:
    """Rows start uniform in [-scale, scale)."""
    return ps.RowInitializer(kind=UNIFORM, scale=scale, seed=seed)  # type: ignore[arg-type]


def zeros() -> ps.RowInitializer:
    return ps.RowInitializer(kind=ZEROS)  # type: ignore[arg-type]


class _Table(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        name: str,
        optimizer: ps.Optimizer | None = None,
        initializer: ps.RowInitializer | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.name = num_embeddings, embedding_dim, name
        self.exchange = exchange()
        self.exchange.declare(name, num_embeddings, embedding_dim, optimizer or sgd(0.01), initializer or normal())

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the unique rows as a leaf tensor whose gradient is pushed, each id's index into them)."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"table {self.name!r}: ids must be an integer tensor, got {ids.dtype}")
        unique, inverse = torch.unique(ids.detach().cpu().reshape(-1), return_inverse=True)
        unique_ids = unique.to(torch.int64).numpy()
        training = self.training and torch.is_grad_enabled()
        weight = torch.from_numpy(self.exchange.rows(self.name, unique_ids, training)).to(ids.device)
        if training:
            weight.requires_grad_(True)
            weight.register_hook(lambda grad: self._push(unique_ids, grad))
        return weight, inverse.to(ids.device).reshape(ids.shape)

    def _push(self, ids: np.ndarray, grad: torch.Tensor) -> None:
        values = grad.detach().to("cpu", torch.float32).contiguous().numpy()
        self.exchange.deposit(self.name, RowGradient(ids, values))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, name={self.name!r}"


class Embedding(_Table):
    """As torch.nn.Embedding: ids of any shape -> ids.shape + (embedding_dim,)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight, index = self._rows(ids)
        return F.embedding(index, weight)


class EmbeddingBag(_Table):
    """As torch.nn.EmbeddingBag: sums or means of bags of rows.

    Takes 1-D ids with `offsets` (bag starts), or 2-D ids [batch, bag] without
    offsets; `per_sample_weights` as torch's (mode "sum" only).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, mode: str = "mean", **kwargs: object) -> None:
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, **kwargs)  # type: ignore[arg-type]
        self.mode = mode

    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        weight, index = self._rows(ids)
        return F.embedding_bag(index, weight, offsets, mode=self.mode, per_sample_weights=per_sample_weights)


def prefetch(batches: dict[_Table, torch.Tensor]) -> None:
    """Start pulling the rows of the next batch now, for all tables in one call per shard, so that the
    round trip overlaps the current step; the next forward of each table with the same ids uses them."""
    if not batches:
        return
    ids = {
        table.name: torch.unique(t.detach().cpu().reshape(-1)).to(torch.int64).numpy() for table, t in batches.items()
    }
    exchange().prefetch(ids)
