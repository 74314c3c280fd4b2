"""Run outputs: runs/<run-id>/metrics.json and a loss/accuracy plot, training.png."""

from __future__ import annotations

import json
import os
from typing import Any


def write_metrics(run_dir: str, metrics: dict[str, Any]) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, path)
    return path


def plot_training(run_dir: str, epochs: list[dict[str, Any]], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [e["epoch"] for e in epochs]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(numbers, [e["train_loss"] for e in epochs], marker="o", label="train")
    loss_axis.plot(numbers, [e["test_loss"] for e in epochs], marker="o", label="test")
    loss_axis.set(title="Cross-entropy loss", xlabel="epoch", ylabel="loss")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    accuracy_axis.plot(numbers, [e["test_accuracy"] for e in epochs], marker="o", color="tab:green")
    accuracy_axis.set(title="Test accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    accuracy_axis.grid(alpha=0.3)
    if epochs:
        last = epochs[-1]
        accuracy_axis.annotate(
            f"{last['test_accuracy']:.3f}",
            (last["epoch"], last["test_accuracy"]),
            textcoords="offset points",
            xytext=(-10, -15),
        )
    figure.suptitle(title)
    figure.tight_layout()
    path = os.path.join(run_dir, "training.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
