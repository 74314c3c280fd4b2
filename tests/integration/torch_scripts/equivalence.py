"""A user script for the equivalence tests: a few deterministic steps, then each rank saves its model.

argv: OUT_DIR OPTIMIZER(sgd|adamw) MODEL(mlp|tied|bn) STEPS BACKWARD_PASSES COMPRESSION
Rank r trains on rows [r*B, (r+1)*B) of each step's combined batch; every rank starts from a
different local init, which broadcast_parameters replaces with rank 0's.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import nanodist.torch as nd

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import BATCH, batch, build, make_optimizer  # noqa: E402


def main() -> None:
    out, opt_name, model_name, steps, passes, compression = sys.argv[1:7]
    nd.init()
    torch.manual_seed(100 + nd.rank())  # different local inits on purpose
    model = build(model_name)
    optimizer = nd.DistributedOptimizer(
        make_optimizer(opt_name, model),
        named_parameters=model.named_parameters(),
        named_buffers=model.named_buffers(),
        backward_passes_per_step=int(passes),
        compression=compression,
    )
    nd.broadcast_parameters(model.state_dict(), root_rank=0)
    nd.broadcast_optimizer_state(optimizer, root_rank=0)
    for step in range(int(steps)):
        optimizer.zero_grad()
        for p in range(int(passes)):
            x, y = batch(step * int(passes) + p, nd.size())
            rows = slice(nd.rank() * BATCH, (nd.rank() + 1) * BATCH)
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
        optimizer.step()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(f"{out}/rank-{nd.rank()}.npz", **state)
    nd.shutdown()


if __name__ == "__main__":
    main()
