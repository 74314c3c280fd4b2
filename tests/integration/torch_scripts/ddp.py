"""A DDP user's script: the model wrapped, the optimizer the user's own.

argv: OUT_DIR IMPL(nanodist|torch) OPTIMIZER(sgd|adamw) MODEL(mlp|bn) STEPS ACCUMULATE(1|2)
nanodist: nd.DistributedDataParallel under `nanodist run`; torch: torch's own DDP over gloo under
torchrun, the reference for BatchNorm. ACCUMULATE 2: the first of two backward passes runs inside no_sync().
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from models import BATCH, batch, build, make_optimizer  # noqa: E402


def main() -> None:
    out, impl, opt_name, model_name, steps, accumulate = sys.argv[1:7]
    if impl == "torch":
        torch.distributed.init_process_group("gloo")
        rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        import nanodist.torch as nd

        nd.init()
        rank, size = nd.rank(), nd.size()
    torch.manual_seed(100 + rank)  # different local inits on purpose: the wrapper starts all from rank 0's
    inner = build(model_name)
    if impl == "torch":
        model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(inner)
    else:
        model = nd.DistributedDataParallel(inner)
    optimizer = make_optimizer(opt_name, model)
    passes = int(accumulate)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    for step in range(int(steps)):
        optimizer.zero_grad()
        for p in range(passes):
            x, y = batch(step * passes + p, size)
            local = model.no_sync() if p < passes - 1 else contextlib.nullcontext()  # type: ignore[operator]
            with local:
                (torch.nn.functional.cross_entropy(model(x[rows]), y[rows]) / passes).backward()
        optimizer.step()
    np.savez(f"{out}/rank-{rank}.npz", **{k: v.detach().numpy() for k, v in inner.state_dict().items()})
    if impl == "torch":
        torch.distributed.barrier()  # no rank tears its connections down while a peer still reads from them
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
