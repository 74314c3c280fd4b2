"""Models, data and the single-process reference shared by the torch tests and their scripts."""

from __future__ import annotations

import torch
from torch import nn

BATCH = 8  # per worker and per backward pass
FEATURES, CLASSES = 12, 5


class Tied(nn.Module):
    """An embedding-style weight used twice (input and output), and a parameter that gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(FEATURES, FEATURES, bias=False)
        self.head = nn.Linear(FEATURES, CLASSES)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.shared(x))
        h = self.shared(h.t().contiguous().t())  # the same weight again, on a transposed (strided) input
        return self.head(h)


def build(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    if name == "tied":
        return Tied()
    if name == "bn":
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))
    raise ValueError(name)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    raise ValueError(name)


def batch(index: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined batch number `index`: world * BATCH samples, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + index)
    x = torch.randn(world * BATCH, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (world * BATCH,), generator=g)
    return x, y


def reference(opt_name: str, model_name: str, steps: int, passes: int, world: int) -> dict[str, torch.Tensor]:
    """Single-process training on the combined batch, from rank 0's init."""
    torch.manual_seed(100)
    model = build(model_name)
    optimizer = make_optimizer(opt_name, model)
    for step in range(steps):
        optimizer.zero_grad()
        xs, ys = zip(*(batch(step * passes + p, world) for p in range(passes)), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}
