"""Models, data and the single-process torch reference for the embedding-table tests.

A table of ROWS x DIM (its rows on both shards, ids repeated inside each
batch) feeds a small dense head. The reference is torch's own sparse
embedding with the matching optimizer, trained on the combined batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nanodist.row_init import UNIFORM, initial_rows

ROWS, DIM, CLASSES, BAG = 1000, 8, 3, 3
BATCH = 6  # samples per worker per step
LR = {"sgd": 0.5, "adagrad": 0.3}
DENSE_LR = 0.1
INIT_SCALE, INIT_SEED = 0.1, 11


def ids_of(step: int, world: int) -> torch.Tensor:
    """The combined batch's ids [world * BATCH, BAG]: 40 distinct rows spread over the table, so many repeat."""
    rng = np.random.default_rng(step)
    return torch.from_numpy(rng.integers(0, 40, (world * BATCH, BAG)) * 24 + 7)


def labels_of(step: int, world: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1000 + step).integers(0, CLASSES, world * BATCH))


def head() -> nn.Linear:
    torch.manual_seed(100)  # rank 0's init, which broadcast_parameters gives every rank
    return nn.Linear(DIM, CLASSES)


def pool(kind: str, rows: torch.Tensor) -> torch.Tensor:
    """[batch, BAG, DIM] embeddings -> [batch, DIM] features: the bag's mean, or the first id's row."""
    return rows.mean(dim=1) if kind == "bag" else rows[:, 0]


def reference(optimizer: str, kind: str, steps: int, world: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the head's state, every table row) after `steps` steps of one process on the combined batches."""
    table = nn.Embedding(ROWS, DIM, sparse=True)
    with torch.no_grad():
        table.weight.copy_(
            torch.from_numpy(initial_rows(np.arange(ROWS), DIM, kind=UNIFORM, scale=INIT_SCALE, seed=INIT_SEED))
        )
    dense = head()
    if optimizer == "sgd":
        sparse_opt: torch.optim.Optimizer = torch.optim.SGD(table.parameters(), lr=LR["sgd"])
    else:
        sparse_opt = torch.optim.Adagrad(table.parameters(), lr=LR["adagrad"], eps=1e-10)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=DENSE_LR)
    for step in range(steps):
        ids = ids_of(step, world)
        emb = table(ids) if kind == "bag" else table(ids[:, :1])
        loss = nn.functional.cross_entropy(dense(pool(kind, emb)), labels_of(step, world))
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
    return dense.state_dict(), table.weight.detach()
