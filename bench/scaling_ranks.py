"""One worker of bench/scaling.py: a step whose compute is a sleep, then the gradient exchange alone.

argv: SYSTEM(nanodist|ddp) MODEL_MB STEPS WARMUP SLEEP_S [RANK WORLD PORT for ddp]

Each step sleeps SLEEP_S (the forward and backward passes' compute, which the CPU does not spend), gives
every parameter the gradient rank + 1, then synchronises: nanodist through nd.DistributedOptimizer's
step; DDP as its reducer does, with all_reduce over gloo on flat 25 MB buckets. The wrapped optimizer's
update does nothing, since the update is compute too. Rank 0 prints one JSON line: the median step after
the warmup, the overhead (that step minus the sleep) and its peak memory. Every rank checks that it got
the mean gradient, (world + 1) / 2, so a layout that skips the exchange cannot pass for a fast one.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch

PARAMS = 4  # the model: this many float32 tensors of equal size
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


class NoUpdate(torch.optim.Optimizer):
    """An optimizer whose step does nothing: the update is compute, which the sleep stands for."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        super().__init__(params, {})

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


def buckets(params: list[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """DDP's bucketing: reverse parameter order (the order backward produces them), closed at the cap."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for param in reversed(params):
        nbytes = param.numel() * param.element_size()
        if not out or size + nbytes > cap_bytes:
            out.append([])
            size = 0
        out[-1].append(param)
        size += nbytes
    return out


def ddp_exchange(params: list[torch.Tensor], world: int, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Average the gradients as DDP's reducer does (copy into a flat bucket, divide, all_reduce, copy back),
    then step the optimizer."""
    import torch.distributed as dist

    plan = [(members, torch.empty(sum(p.numel() for p in members))) for members in buckets(params, BUCKET_BYTES)]

    def run() -> None:
        for members, flat in plan:
            offsets = [0]
            for p in members:
                assert p.grad is not None
                flat[offsets[-1] : offsets[-1] + p.numel()].copy_(p.grad.view(-1))
                offsets.append(offsets[-1] + p.numel())
            flat.div_(world)
            dist.all_reduce(flat)
            for p, a, b in zip(members, offsets, offsets[1:], strict=False):
                assert p.grad is not None
                p.grad.view(-1).copy_(flat[a:b])
        optimizer.step()

    return run


def main() -> None:
    system, model_mb, sleep_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[5])
    steps, warmup = int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)  # many workers share 2 cores
    numel = int(model_mb * 2**20 / 4 / PARAMS)
    params = [torch.zeros(numel, requires_grad=True) for _ in range(PARAMS)]
    optimizer: torch.optim.Optimizer = NoUpdate(params)
    exchange: Callable[[], object]
    if system == "nanodist":
        import nanodist.torch as nd

        nd.init()
        rank, world = nd.rank(), nd.size()
        optimizer = nd.DistributedOptimizer(optimizer, named_parameters=[(f"p{i}", p) for i, p in enumerate(params)])
        exchange = optimizer.step
    else:
        import torch.distributed as dist

        rank, world, port = (int(a) for a in sys.argv[6:9])
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
        exchange = ddp_exchange(params, world, optimizer)

    # Autograd on the leaf alone (no forward, no model backward) sets .grad, as backward's last act does, so
    # nanodist's per-parameter hooks fire; the expanded scalar takes no memory of its own.
    fill = torch.tensor(float(rank + 1))

    def step() -> float:
        began = time.perf_counter()
        time.sleep(sleep_s)
        optimizer.zero_grad()
        for p in params:
            p.backward(fill.expand_as(p))
        exchange()
        return time.perf_counter() - began

    times = [step() for _ in range(warmup + steps)][warmup:]
    expected = (world + 1) / 2
    got = [float(p.grad[0]) for p in params if p.grad is not None]
    if len(got) != PARAMS or any(abs(g - expected) > 1e-4 * expected for g in got):
        raise SystemExit(f"rank {rank}: mean gradient {got}, expected {expected} on each of {PARAMS} parameters")
    median_ms = statistics.median(times) * 1e3
    if rank == 0:
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps({"step_ms": median_ms, "overhead_ms": median_ms - sleep_s * 1e3, "rss_mb": rss_mb}), flush=True
        )
    if system == "ddp":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
