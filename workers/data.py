"""Real data with no download (scikit-learn's bundled digits) and DistributedSampler-style shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def features(self) -> int:
        return self.x_train.shape[1]

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype: type = np.float32) -> Dataset:
    """1,797 8x8 digit images shipped inside scikit-learn, scaled to [0, 1], split the same way every time."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.data / 16.0).astype(dtype)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return Dataset(x[train], y[train], x[test], y[test])


@dataclass(frozen=True)
class ShardSampler:
    """Disjoint shards that together cover the data, reshuffled each epoch with a shared seed.

    Like torch's DistributedSampler: the permutation is padded by wrapping so
    every rank gets the same number of samples, then rank r takes every
    world-th index starting at r.
    """

    samples: int
    rank: int
    world: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world})")
        if self.world > self.samples:
            raise ValueError(f"{self.world} workers but only {self.samples} samples: a shard would be empty")

    @property
    def shard_size(self) -> int:
        return -(-self.samples // self.world)

    def indices(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.samples)
        padded = np.resize(order, self.shard_size * self.world)
        return padded[self.rank :: self.world]

    def batches(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """Full batches of this rank's shard (the ragged tail is dropped so all ranks step together)."""
        if batch_size > self.shard_size:
            raise ValueError(
                f"batch size {batch_size} exceeds the shard of {self.shard_size} samples "
                f"({self.samples} samples over {self.world} workers)"
            )
        shard = self.indices(epoch)
        return [shard[i : i + batch_size] for i in range(0, self.shard_size - batch_size + 1, batch_size)]
