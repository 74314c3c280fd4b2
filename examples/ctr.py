"""A click-through-rate model with embedding tables on the parameter servers, trained with nanodist.torch.

A synthetic click log comes from a known ground-truth model: each sample has
FEATURES categorical ids (Zipf-distributed over vocabularies of up to 10M,
scrambled so that popular ids are spread over the table), a bag of 3
"recently seen" ids, and DENSE numeric features. The true click probability
is a logistic function of a hidden weight per id and of the dense features;
the hidden weights are a hash of (feature, id), so a 10M vocabulary costs no
memory. The model: one nd.Embedding per feature, an nd.EmbeddingBag for the
bag, an MLP on top. Rank 0 reports held-out AUC next to the ground truth's
own AUC on the same data (the best any model can do), several times per
epoch. Like real click-through-rate models, this one overfits after its
first epoch (the rows of rare ids memorise their few samples), so the
default is one epoch over more data.

    nanodist run --groups tcp:2 examples/ctr.py --vocab 1000000

Rank 0 writes runs/<run-id>/metrics.json and training.png.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

import nanodist.torch as nd
from nanodist.client import adagrad
from nanodist.row_init import NORMAL, initial_rows
from nanodist.workers.report import write_metrics

DENSE, BAG, SCRAMBLE = 4, 3, 2654435761  # SCRAMBLE: a prime, so id -> id * SCRAMBLE mod vocab permutes ids


class ClickLog:
    """The ground truth and the samples drawn from it."""

    def __init__(self, features: int, vocab: int, zipf: float, seed: int) -> None:
        self.features, self.vocab, self.zipf, self.seed = features, vocab, zipf, seed
        self.dense_weights = np.random.default_rng(seed).normal(0, 0.5, DENSE)

    def weights(self, table: int, ids: np.ndarray) -> np.ndarray:
        """The hidden weight of each id: a hash of (table, id), so nothing is stored."""
        return initial_rows(ids.reshape(-1), 1, kind=NORMAL, scale=1.0, seed=self.seed * 1000 + table)[:, 0].reshape(
            ids.shape
        )

    def ids(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        ranks = (rng.zipf(self.zipf, shape) - 1) % self.vocab
        return (ranks * SCRAMBLE) % self.vocab

    def sample(self, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids = self.ids(rng, (count, self.features))
        bag = self.ids(rng, (count, BAG))
        dense = rng.standard_normal((count, DENSE)).astype(np.float32)
        logit = -1.0 + dense @ self.dense_weights
        logit += sum(self.weights(f, ids[:, f]) for f in range(self.features)) * 0.8
        logit += self.weights(self.features, bag).mean(axis=1) * 0.8
        truth = 1 / (1 + np.exp(-logit))
        clicked = (rng.random(count) < truth).astype(np.float32)
        return {"ids": ids, "bag": bag, "dense": dense, "clicked": clicked, "truth": truth}


class CTR(nn.Module):
    def __init__(self, features: int, vocab: int, dim: int, lr: float) -> None:
        super().__init__()
        init = nd.normal(0.01)
        self.tables = [
            nd.Embedding(vocab, dim, name=f"feature{f}", optimizer=adagrad(lr), initializer=init)
            for f in range(features)
        ]
        self.bag = nd.EmbeddingBag(vocab, dim, name="recent", mode="mean", optimizer=adagrad(lr), initializer=init)
        for f, table in enumerate(self.tables):
            self.add_module(f"feature{f}", table)
        width = (features + 1) * dim + DENSE
        self.top = nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embedded = [table(batch["ids"][:, f]) for f, table in enumerate(self.tables)]
        features = torch.cat([*embedded, self.bag(batch["bag"]), batch["dense"]], dim=1)
        return self.top(features).squeeze(1)

    def lookups(self, batch: dict[str, torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
        """The ids each table will look up for `batch` (for nd.prefetch)."""
        return {**{t: batch["ids"][:, f] for f, t in enumerate(self.tables)}, self.bag: batch["bag"]}


def as_tensors(data: dict[str, np.ndarray], rows: slice) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v[rows])) for k, v in data.items() if k != "truth"}


def evaluate(model: CTR, test: dict[str, np.ndarray], chunk: int = 8192) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        scores = [
            torch.sigmoid(model(as_tensors(test, slice(a, a + chunk)))).numpy()
            for a in range(0, len(test["clicked"]), chunk)
        ]
    model.train()
    predicted = np.concatenate(scores)
    return float(roc_auc_score(test["clicked"], predicted)), float(log_loss(test["clicked"], predicted))


def plot(run_dir: str, evaluations: list[dict[str, float]], truth_auc: float, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [e["samples"] for e in evaluations]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(seen, [e["train_loss"] for e in evaluations], marker="o", label="train")
    loss_axis.plot(seen, [e["test_loss"] for e in evaluations], marker="o", label="test")
    loss_axis.set(title="Log loss", xlabel="training samples")
    loss_axis.legend()
    auc_axis.plot(seen, [e["test_auc"] for e in evaluations], marker="o", color="tab:green", label="model")
    auc_axis.axhline(truth_auc, color="tab:gray", linestyle="--", label=f"ground truth {truth_auc:.3f}")
    auc_axis.set(title="Held-out AUC", xlabel="training samples")
    auc_axis.legend()
    for axis in (loss_axis, auc_axis):
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path = os.path.join(run_dir, "training.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=4, help="categorical features, one table each")
    parser.add_argument("--vocab", type=int, default=20_000, help="ids per feature (up to 10,000,000)")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.2, help="exponent of the id distribution")
    parser.add_argument("--samples", type=int, default=400_000, help="training samples, over all workers")
    parser.add_argument("--test-samples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--evaluations", type=int, default=4, help="held-out evaluations per epoch")
    parser.add_argument("--batch-size", type=int, default=256, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05, help="Adagrad's, for the tables")
    parser.add_argument("--dense-lr", type=float, default=0.003, help="Adam's, for the MLP")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    nd.init()
    torch.manual_seed(args.seed)
    log = ClickLog(args.features, args.vocab, args.zipf, args.seed)
    train = log.sample(args.samples // nd.size(), np.random.default_rng([args.seed, nd.rank()]))
    test = log.sample(args.test_samples, np.random.default_rng([args.seed, 1 << 20]))
    truth_auc = float(roc_auc_score(test["clicked"], test["truth"]))

    model = CTR(args.features, args.vocab, args.dim, args.lr)
    optimizer = nd.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=args.dense_lr), named_parameters=model.named_parameters()
    )
    nd.broadcast_parameters(model.state_dict(), root_rank=0)
    steps = len(train["clicked"]) // args.batch_size
    every = max(1, -(-steps // args.evaluations))  # rounded up: the last evaluation is at the end of the epoch
    evaluations: list[dict[str, float]] = []
    began, losses, seen = time.perf_counter(), [], 0
    for epoch in range(1, args.epochs + 1):
        batches = [as_tensors(train, slice(s * args.batch_size, (s + 1) * args.batch_size)) for s in range(steps)]
        for step, batch in enumerate(batches):
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch["clicked"])
            optimizer.zero_grad()
            loss.backward()
            if step + 1 < steps:
                nd.prefetch(model.lookups(batches[step + 1]))  # the next batch's rows travel during this step
            optimizer.step()
            losses.append(loss.item())
            seen += args.batch_size * nd.size()
            if (step + 1) % every and step + 1 < steps:
                continue
            rate = len(losses) * args.batch_size * nd.size() / (time.perf_counter() - began)
            if nd.rank() == 0:
                auc, test_loss = evaluate(model, test)
                record = {
                    "epoch": epoch,
                    "samples": seen,
                    "train_loss": round(float(np.mean(losses)), 6),
                    "test_loss": round(test_loss, 6),
                    "test_auc": round(auc, 6),
                    "samples_per_s": round(rate),
                }
                evaluations.append(record)
                print(
                    f"epoch {epoch}, {seen} samples: train loss {record['train_loss']:.4f}, "
                    f"test AUC {auc:.4f} (ground truth {truth_auc:.4f}), {rate:.0f} samples/s",
                    flush=True,
                )
            began, losses = time.perf_counter(), []
    if nd.rank() == 0:
        run_id = os.environ.get("NANODIST_RUN_ID", "ctr")
        run_dir = os.path.join(os.environ.get("NANODIST_RUNS_DIR", "runs"), run_id)
        metrics = {
            "run_id": run_id,
            "config": vars(args),
            "world_size": nd.size(),
            "evaluations": evaluations,
            "ground_truth_auc": round(truth_auc, 6),
            "final_test_auc": evaluations[-1]["test_auc"],
        }
        write_metrics(run_dir, metrics)
        title = f"nanodist.torch CTR: {nd.size()} workers, {args.features} x {args.vocab:,} ids"
        plot(run_dir, evaluations, truth_auc, title)
        print(f"wrote {run_dir}/metrics.json and training.png", flush=True)
    nd.shutdown()


if __name__ == "__main__":
    main()
