"""A small convolutional network on scikit-learn's digits (8x8 images), trained with nanodist.torch.

Run it on 4 workers (an MPI group and a TCP group, services started for you):

    nanodist run --groups mpi:2,tcp:2 examples/digits_cnn.py --epochs 12

or alone, as a plain script: `python examples/digits_cnn.py`. Rank 0 writes
runs/<run-id>/metrics.json and training.png.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import nanodist.torch as nd
from nanodist.client import momentum
from nanodist.workers.report import plot_training, write_metrics


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def datasets(seed: int) -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def evaluate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return loss, accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate, decayed by a cosine schedule")
    parser.add_argument("--compression", choices=["none", "fp16", "bf16"], default="none")
    parser.add_argument("--server-optimizer", action="store_true", help="the parameter servers run SGD with momentum")
    parser.add_argument(
        "--server-lr", type=float, default=0.02, help="its learning rate (constant: ASP and SSP gradients are stale)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    nd.init()
    torch.manual_seed(args.seed)
    train, test = datasets(args.seed)
    sampler = DistributedSampler(train, num_replicas=nd.size(), rank=nd.rank(), shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    model = Net()
    optimizer = nd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=args.compression,
        server_optimizer=momentum(args.server_lr) if args.server_optimizer else None,
    )
    nd.broadcast_parameters(model.state_dict(), root_rank=0)
    nd.broadcast_optimizer_state(optimizer, root_rank=0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    epochs = []
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        began, losses = time.perf_counter(), []
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        schedule.step()
        if nd.rank() == 0:
            test_loss, accuracy = evaluate(model, test)
            record = {
                "epoch": epoch,
                "train_loss": round(sum(losses) / len(losses), 6),
                "test_loss": round(test_loss, 6),
                "test_accuracy": round(accuracy, 6),
                "seconds": round(time.perf_counter() - began, 3),
            }
            epochs.append(record)
            print(
                f"[rank 0] epoch {epoch}: train loss {record['train_loss']:.4f}, test accuracy {accuracy:.4f}",
                flush=True,
            )
    if nd.rank() == 0:
        run_id = os.environ.get("NANODIST_RUN_ID", "digits-cnn")
        run_dir = os.path.join(os.environ.get("NANODIST_RUNS_DIR", "runs"), run_id)
        metrics = {
            "run_id": run_id,
            "config": vars(args),
            "world_size": nd.size(),
            "epochs": epochs,
            "final_test_accuracy": epochs[-1]["test_accuracy"],
        }
        write_metrics(run_dir, metrics)
        plot_training(run_dir, epochs, f"nanodist.torch digits CNN: {nd.size()} workers")
        print(f"wrote {run_dir}/metrics.json and training.png", flush=True)
    nd.shutdown()


if __name__ == "__main__":
    main()
