"""argv: RANK [kill]. That rank raises (or kills itself with SIGKILL) in its third step; the others train on."""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn

import nanodist.torch as nd

nd.init()
failing, how = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "raise")
model = nn.Linear(4, 2)
optimizer = nd.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
)
for step in range(200):
    optimizer.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    if step == 2 and nd.rank() == failing:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("the user's script failed on purpose")
    optimizer.step()
