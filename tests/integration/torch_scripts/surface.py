"""A user script for Horovod's surface beyond the optimizer: a frozen layer, gradient clipping between
synchronize() and step(), and the collectives on a script's own tensors and objects.

argv: OUT_DIR. Each rank saves its model (rank-R.npz) and what its collectives returned (rank-R.json).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import nanodist.torch as nd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import BATCH, batch, build  # noqa: E402

STEPS = 5
MAX_NORM = 0.05  # small enough that every step clips


def frozen_mlp() -> torch.nn.Module:
    model = build("mlp")
    model[0].requires_grad_(False)
    return model


def clipped_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()


def reference(world: int, clip: bool = True) -> dict[str, torch.Tensor]:
    """One process on the combined batch of `world` ranks, from rank 0's init, clipping as the script does."""
    torch.manual_seed(100)
    model = frozen_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = batch(step, world)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def train(out: str) -> None:
    torch.manual_seed(100 + nd.rank())  # different local inits on purpose
    model = frozen_mlp()
    # Every parameter, the frozen ones too, as plain torch scripts pass them.
    optimizer = nd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), named_parameters=model.named_parameters()
    )
    nd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = batch(step, nd.size())
        rows = slice(nd.rank() * BATCH, (nd.rank() + 1) * BATCH)
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.synchronize()  # the averaged gradients, which clipping must see
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        with optimizer.skip_synchronize():
            optimizer.step()
    np.savez(f"{out}/rank-{nd.rank()}.npz", **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    collectives(out)
    model[0].requires_grad_(True)  # unfrozen after wrapping: refused, naming why
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
    try:
        optimizer.step()
    except RuntimeError as refused:
        print(f"refused: {refused}", flush=True)


def collectives(out: str) -> None:
    rank, size = nd.rank(), nd.size()
    for line in range(20):  # lines written in pieces, which the ranks' output must never splice
        print(f"line {line} of rank {rank}:", end="", flush=True)
        print(" " + "x" * 200, flush=True)
    results = {
        "average": nd.allreduce(torch.tensor([float(rank), 2.0 * rank])).tolist(),
        "sum": nd.allreduce(torch.tensor([rank + 1]), op=nd.Sum, name="sum").tolist(),
        "max": nd.allreduce(torch.tensor([float(rank)]), op=nd.Max).tolist(),
        "allgather": nd.allgather(torch.full((rank + 1, 2), rank)).tolist(),
        "broadcast": nd.broadcast(torch.tensor([10.0 * rank]), root_rank=size - 1).tolist(),
    }
    state = {"epoch": 3, "lrs": (0.1, 0.01), 7: None, "rank": rank, "counts": torch.arange(3) * (rank + 1)}
    received = nd.broadcast_object(state, root_rank=1)
    results["broadcast_object"] = {
        "epoch": received["epoch"],
        "lrs": list(received["lrs"]),
        "lrs_is_tuple": isinstance(received["lrs"], tuple),
        "int_key": 7 in received,
        "rank": received["rank"],
        "counts": received["counts"].tolist(),
    }
    results["allgather_object"] = nd.allgather_object({"rank": rank, "name": f"r{rank}"})
    try:
        nd.broadcast_object({1, 2}, root_rank=0) if rank == 0 else None
    except TypeError as refused:
        results["refused"] = str(refused)
    with open(f"{out}/rank-{rank}.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    nd.init()
    train(sys.argv[1])
    nd.shutdown()
