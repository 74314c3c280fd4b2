"""A Horovod script on nanodist: the same lines with `import nanodist.torch as nd` in place of
`import horovod.torch as hvd`. Run it with `nanodist run --groups mpi:2,tcp:2 examples/horovod_style.py`.

It shows what a real script needs beyond the optimizer: data that does not split evenly (nd.join),
gradient clipping (synchronize, clip, skip_synchronize), a metric averaged over the ranks
(nd.allreduce) and a small object handed from rank 0 to all (nd.broadcast_object).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nanodist.torch as nd

nd.init()
torch.manual_seed(0)
features = torch.randn(1003, 20)  # 1003 rows: the ranks' shares differ by one batch
dataset = TensorDataset(features, (features[:, 0] > 0).long())
# Every size()-th row, with no padding (DistributedSampler would repeat rows): some ranks get a batch more.
shares = list(range(nd.rank(), len(dataset), nd.size()))
loader = DataLoader(torch.utils.data.Subset(dataset, shares), batch_size=32)

model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
optimizer = nd.DistributedOptimizer(
    torch.optim.AdamW(model.parameters(), lr=1e-2), named_parameters=model.named_parameters()
)
nd.broadcast_parameters(model.state_dict(), root_rank=0)
nd.broadcast_optimizer_state(optimizer, root_rank=0)
settings = nd.broadcast_object({"epochs": 3, "max_norm": 1.0} if nd.rank() == 0 else None, root_rank=0)

for epoch in range(settings["epochs"]):
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.synchronize()  # the averaged gradients: clip those, not this rank's own
        nn.utils.clip_grad_norm_(model.parameters(), settings["max_norm"])
        with optimizer.skip_synchronize():
            optimizer.step()
    last = nd.join()  # this rank is out of batches: the others finish the epoch without it
    with torch.no_grad():
        correct = (model(features).argmax(1) == dataset.tensors[1]).float().mean()
    accuracy = nd.allreduce(correct, name=f"accuracy-{epoch}")  # the mean over the ranks
    if nd.rank() == 0:
        print(f"epoch {epoch}: accuracy {accuracy.item():.3f} (rank {last} joined last)", flush=True)
nd.shutdown()
