"""A user script with one embedding table far larger than a worker's memory (ROWS x 16).

argv: OUT_DIR ROWS STEPS [out-of-range]
Each rank writes its peak RSS; rank 0 also writes how many rows the servers hold.
With `out-of-range`, the first batch holds the id ROWS, which must fail before anything is sent.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import torch

import nanodist.torch as nd
from nanodist.client import adagrad
from nanodist.torch.embedding import exchange

BATCH, BAG, DIM = 256, 4, 16


HOT = 100  # the first id of each bag comes from 100 rows spread over the table, so they are seen often


def ids_of(rank: int, step: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng([rank, step])
    ids = rng.integers(0, rows, (BATCH, BAG))
    ids[:, 0] = rng.integers(0, HOT, BATCH) * (rows // HOT)
    return ids


def main() -> None:
    out, rows, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    nd.init()
    table = nd.EmbeddingBag(rows, DIM, name="huge", mode="sum", optimizer=adagrad(0.05), initializer=nd.normal(0.01))
    head = torch.nn.Linear(DIM, 1)
    optimizer = nd.DistributedOptimizer(
        torch.optim.SGD(head.parameters(), lr=0.1), named_parameters=head.named_parameters()
    )
    nd.broadcast_parameters(head.state_dict(), root_rank=0)
    losses = []
    for step in range(steps):
        ids = torch.from_numpy(ids_of(nd.rank(), step, rows))
        if len(sys.argv) > 4:
            ids[0, 0] = rows
        clicked = (ids[:, 0] // (rows // HOT) % 2).float()  # a rule the hot rows can learn
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(table(ids)).squeeze(1), clicked)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    nd.synchronize()
    report = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "losses": losses}
    if nd.rank() == 0:
        touched = np.unique(
            np.concatenate([ids_of(r, s, rows).ravel() for r in range(nd.size()) for s in range(steps)])
        )
        report["rows_touched"] = len(touched)
        report["rows_held"] = sum(k.rows_held for k in exchange().client.list_keys() if k.key.startswith("huge:"))
    with open(f"{out}/rank-{nd.rank()}.json", "w") as f:
        json.dump(report, f)
    nd.shutdown()


if __name__ == "__main__":
    main()
