"""A user script whose ranks have different numbers of batches: rank 1 runs out first.

argv: OUT_DIR WAY(join|ddp|none). join: Horovod's nd.join(); ddp: nd.DistributedDataParallel's
join(); none: rank 1 just ends its script. Each rank saves its model and the rank join() returned.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import numpy as np
import torch

import nanodist.torch as nd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import BATCH, batch, build  # noqa: E402

STEPS, SHORT_RANK, SHORT_STEPS = 6, 1, 3


def steps_of(rank: int) -> int:
    return SHORT_STEPS if rank == SHORT_RANK else STEPS


def reference(world: int) -> dict[str, torch.Tensor]:
    """One process, each step on the rows of the ranks that still had data."""
    torch.manual_seed(100)
    model = build("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = batch(step, world)
        rows = torch.cat([torch.arange(r * BATCH, (r + 1) * BATCH) for r in range(world) if step < steps_of(r)])
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def main() -> None:
    out, way = sys.argv[1:3]
    nd.init()
    rank = nd.rank()
    torch.manual_seed(100 + rank)  # different local inits on purpose
    model = build("mlp")
    if way == "ddp":
        model = nd.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = nd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), named_parameters=model.named_parameters()
        )
        nd.broadcast_parameters(model.state_dict(), root_rank=0)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    last = None
    with model.join() if isinstance(model, nd.DistributedDataParallel) else contextlib.nullcontext():
        for step in range(steps_of(rank)):
            x, y = batch(step, nd.size())
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimizer.step()
    if way == "join":
        last = nd.join()
    inner = model.module if way == "ddp" else model
    np.savez(f"{out}/rank-{rank}.npz", **{k: v.detach().numpy() for k, v in inner.state_dict().items()})
    with open(f"{out}/rank-{rank}.json", "w") as f:
        json.dump({"last": last}, f)
    print(f"left at {time.time()}", flush=True)  # shutdown() tells the others (or, after join, nothing is left)
    nd.shutdown()


if __name__ == "__main__":
    main()
