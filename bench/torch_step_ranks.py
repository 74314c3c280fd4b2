"""One worker of bench/torch_step.py: nanodist.torch (under `nanodist run`; its optimizer wrapper, or
nanodist-ddp: its DistributedDataParallel wrapper) or torch DDP over gloo.

argv: SYSTEM(nanodist|nanodist-ddp|ddp) MODEL(cnn|mlp) COMPRESSION(none|fp16) STEPS [RANK WORLD PORT for ddp]
Rank 0 prints one JSON line: the median step with communication, and the median of the same step on a
plain copy of the model with no communication at all, both measured in this run on every worker at once.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from digits_cnn import Net  # noqa: E402

BATCH = 16  # per worker


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    if name == "cnn":
        return Net(), torch.randn(BATCH, 1, 8, 8), torch.randint(0, 10, (BATCH,))
    sizes = (64, 4000, 4000, 10)  # 16.3M parameters, as bench/step_time.py's MLP
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers), torch.randn(BATCH, sizes[0]), torch.randint(0, sizes[-1], (BATCH,))


def median_ms(step: Callable[[], None], steps: int) -> float:
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main() -> None:
    system, model_name, compression, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)  # 4 workers share 2 cores
    torch.manual_seed(0)
    model, x, y = build(model_name)
    local, _, _ = build(model_name)
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.9)
    if system == "nanodist":
        import nanodist.torch as nd

        nd.init()
        rank = nd.rank()
        optimizer = nd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            named_parameters=model.named_parameters(),
            compression=compression,
        )
        nd.broadcast_parameters(model.state_dict())
        trained = model
    elif system == "nanodist-ddp":
        import nanodist.torch as nd

        nd.init()
        rank = nd.rank()
        trained = nd.DistributedDataParallel(model, compression=compression)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.9)
    else:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel

        rank, world, port = (int(a) for a in sys.argv[5:8])
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
        )
        trained = DistributedDataParallel(model)
        if compression == "fp16":
            trained.register_comm_hook(None, default_hooks.fp16_compress_hook)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.9)

    def step(net: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        return run

    for _ in range(3):
        step(trained, optimizer)()
    with_comm = median_ms(step(trained, optimizer), steps)
    alone = median_ms(step(local, local_optimizer), steps)
    again = median_ms(step(trained, optimizer), steps)  # both sides of the local run, so drift shows
    if rank == 0:
        print(json.dumps({"step_ms": min(with_comm, again), "local_ms": alone}), flush=True)
    if system == "ddp":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
