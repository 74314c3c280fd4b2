"""A user script for the table tests: a few BSP steps of nd.Embedding or nd.EmbeddingBag and a dense
head, then each rank saves the head and the table rows it reads back.

argv: OUT_DIR OPTIMIZER(sgd|adagrad) KIND(embedding|bag) STEPS PREFETCH(0|1)
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import nanodist.torch as nd
from nanodist.client import adagrad, sgd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tables import BATCH, DENSE_LR, DIM, INIT_SCALE, INIT_SEED, LR, ROWS, ids_of, labels_of, pool  # noqa: E402


def main() -> None:
    out, opt_name, kind, steps, prefetch = sys.argv[1:6]
    nd.init()
    factory = sgd if opt_name == "sgd" else adagrad
    init = nd.uniform(INIT_SCALE, seed=INIT_SEED)
    if kind == "bag":
        table: torch.nn.Module = nd.EmbeddingBag(
            ROWS, DIM, name="items", mode="mean", optimizer=factory(LR[opt_name]), initializer=init
        )
    else:
        table = nd.Embedding(ROWS, DIM, name="items", optimizer=factory(LR[opt_name]), initializer=init)
    torch.manual_seed(100 + nd.rank())  # different local inits: broadcast_parameters replaces them
    dense = torch.nn.Linear(DIM, 3)
    optimizer = nd.DistributedOptimizer(
        torch.optim.SGD(dense.parameters(), lr=DENSE_LR), named_parameters=dense.named_parameters()
    )
    nd.broadcast_parameters(dense.state_dict(), root_rank=0)
    mine = slice(nd.rank() * BATCH, (nd.rank() + 1) * BATCH)

    def batch(step: int) -> torch.Tensor:
        ids = ids_of(step, nd.size())[mine]
        return ids if kind == "bag" else ids[:, :1]

    for step in range(int(steps)):
        ids = batch(step)
        features = table(ids) if kind == "bag" else pool(kind, table(ids))
        loss = torch.nn.functional.cross_entropy(dense(features), labels_of(step, nd.size())[mine])
        optimizer.zero_grad()
        loss.backward()
        if prefetch == "1" and step + 1 < int(steps):
            nd.prefetch({table: batch(step + 1)})
        optimizer.step()
    table.eval()
    with torch.no_grad():
        every_row = torch.arange(ROWS)
        rows = table(every_row[:, None]) if kind == "bag" else table(every_row)
    state = {f"head.{k}": v.numpy() for k, v in dense.state_dict().items()}
    np.savez(f"{out}/rank-{nd.rank()}.npz", rows=rows.numpy(), **state)
    nd.shutdown()


if __name__ == "__main__":
    main()
