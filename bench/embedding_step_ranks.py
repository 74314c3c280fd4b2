"""One worker of bench/embedding_step.py: nanodist.torch tables (under `nanodist run`) or torch DDP over gloo.

argv: SYSTEM(nanodist|ddp) ROWS STEPS [RANK WORLD PORT for ddp]
The model: TABLES sum-pooled embedding bags of ROWS x DIM (BAG ids per sample, Zipf-distributed and
scrambled over the table) and DENSE features, an MLP on top, Adagrad everywhere. Rank 0 prints one
JSON line: the median step, samples per second over all workers, and every rank's peak RSS.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from datetime import timedelta

import numpy as np
import torch
from torch import nn

TABLES, DIM, BAG, DENSE, BATCH = 4, 16, 4, 13, 256  # BATCH per worker
SCRAMBLE = 0x9E3779B1  # odd: id -> id * SCRAMBLE mod ROWS is a permutation when ROWS is not a multiple of 2


def batches(rank: int, rows: int, count: int) -> list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(rank)
    out = []
    for _ in range(count):
        ids = [torch.from_numpy((rng.zipf(1.2, (BATCH, BAG)) * SCRAMBLE) % rows) for _ in range(TABLES)]
        dense = torch.from_numpy(rng.standard_normal((BATCH, DENSE)).astype(np.float32))
        clicked = torch.from_numpy((rng.random(BATCH) < 0.25).astype(np.float32))
        out.append((ids, dense, clicked))
    return out


class Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(DENSE + TABLES * DIM, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, pooled: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([dense, *pooled], dim=1)).squeeze(1)


class Replicated(nn.Module):
    """The DDP side: every table whole on every worker, sparse gradients."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True) for _ in range(TABLES))
        self.top = Top()

    def forward(self, ids: list[torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        return self.top([table(i) for table, i in zip(self.tables, ids, strict=True)], dense)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    system, rows, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)  # 4 workers share 2 cores
    torch.manual_seed(0)
    loss_of = nn.functional.binary_cross_entropy_with_logits
    if system == "nanodist":
        import nanodist.torch as nd
        from nanodist.client import adagrad

        nd.init()
        rank, world = nd.rank(), nd.size()
        tables = [
            nd.EmbeddingBag(rows, DIM, name=f"t{i}", mode="sum", optimizer=adagrad(0.01), initializer=nd.normal(0.01))
            for i in range(TABLES)
        ]
        top = Top()
        optimizer = nd.DistributedOptimizer(
            torch.optim.Adagrad(top.parameters(), lr=0.01), named_parameters=top.named_parameters()
        )
        nd.broadcast_parameters(top.state_dict())
        data = batches(rank, rows, steps + 3)

        def step(i: int) -> None:
            ids, dense, clicked = data[i]
            loss = loss_of(top([t(x) for t, x in zip(tables, ids, strict=True)], dense), clicked)
            optimizer.zero_grad()
            loss.backward()
            if i + 1 < len(data):
                nd.prefetch(dict(zip(tables, data[i + 1][0], strict=True)))
            optimizer.step()

        def gather_rss() -> list[int]:
            return [int(v) for v in nd.job().comm.allgather(np.array([peak_rss()]))[:, 0]] if nd.job() else [peak_rss()]
    else:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        rank, world, port = (int(a) for a in sys.argv[4:7])
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
        model = DistributedDataParallel(Replicated(rows))
        optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
        data = batches(rank, rows, steps + 3)

        def step(i: int) -> None:
            ids, dense, clicked = data[i]
            loss = loss_of(model(ids, dense), clicked)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def gather_rss() -> list[int]:
            out = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
            dist.all_gather(out, torch.tensor([peak_rss()]))
            return [int(t) for t in out]

    times = []
    for i in range(steps + 3):
        began = time.perf_counter()
        step(i)
        if i >= 3:  # warm-up: connections, first rows, allocator
            times.append(time.perf_counter() - began)
    step_ms = statistics.median(times) * 1e3
    rss = gather_rss()
    if rank == 0:
        result = {
            "step_ms": step_ms,
            "samples_per_s": BATCH * world / (step_ms / 1e3),
            "peak_rss_mib": [r >> 20 for r in rss],
        }
        print(json.dumps(result), flush=True)
    if system == "ddp":
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
