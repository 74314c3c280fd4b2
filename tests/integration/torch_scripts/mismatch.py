"""Rank 3 builds a wider last layer than the others: every rank must fail at once, naming it."""

from __future__ import annotations

import torch
from torch import nn

import nanodist.torch as nd

nd.init()
hidden = 16 if nd.rank() != 3 else 32
model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
nd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters())
print("constructed an optimizer over mismatched models", flush=True)
