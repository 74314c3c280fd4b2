"""A torch DDP script on nanodist: `nd.DistributedDataParallel` in place of DDP, the optimizer the
user's own. Run it with `nanodist run --groups mpi:2,tcp:2 examples/ddp_style.py`.

It keeps DDP's shape: the model wrapped, no_sync() for gradient accumulation, join() for ranks
whose data runs out first, and BatchNorm statistics handed from rank 0 at each step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import nanodist.torch as nd

ACCUMULATE = 2  # backward passes per optimizer step

nd.init()  # where a DDP script calls torch.distributed.init_process_group
torch.manual_seed(0)
features = torch.randn(1003, 20)
dataset = TensorDataset(features, (features[:, 0] > 0).long())
loader = DataLoader(Subset(dataset, list(range(nd.rank(), len(dataset), nd.size()))), batch_size=16)

model = nd.DistributedDataParallel(nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2)))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

for epoch in range(3):
    with model.join():  # a rank out of batches takes part in the others' steps until all are done
        for i, (x, y) in enumerate(loader):
            last_pass = i % ACCUMULATE == ACCUMULATE - 1
            with contextlib.nullcontext() if last_pass else model.no_sync():
                (nn.functional.cross_entropy(model(x), y) / ACCUMULATE).backward()
            if last_pass:
                optimizer.step()
                optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        correct = (model(features).argmax(1) == dataset.tensors[1]).float().mean()
    model.train()
    accuracy = nd.allreduce(correct, name=f"accuracy-{epoch}")
    if nd.rank() == 0:
        print(f"epoch {epoch}: accuracy {accuracy.item():.3f}", flush=True)
nd.shutdown()
