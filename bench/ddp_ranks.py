"""One rank of the torch DDP (gloo) anchor for bench/step_time.py; rank 0 prints JSON.

Prints the median step time with DDP's gradient allreduce and without it
(no_sync), on the same MLP and batch as nanodist's workers.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from datetime import timedelta


def main() -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, world, port, steps = (int(a) for a in sys.argv[1:5])
    sizes = [int(s) for s in sys.argv[5].split(",")]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
    )
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = DistributedDataParallel(torch.nn.Sequential(*layers))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, sizes[0])
    y = torch.randint(0, sizes[-1], (16,))

    def step(sync: bool) -> float:
        dist.barrier()
        begin = time.perf_counter()
        optimizer.zero_grad()
        if sync:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        else:
            with model.no_sync():
                torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - begin

    for _ in range(3):
        step(True)
    with_sync = statistics.median(step(True) for _ in range(steps))
    local = statistics.median(step(False) for _ in range(steps))
    if rank == 0:
        print(json.dumps({"step_ms": with_sync * 1e3, "local_ms": local * 1e3}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
