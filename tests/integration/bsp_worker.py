"""A worker process for the BSP integration test: push deterministic gradients, pull each step."""

import sys

import numpy as np

from nanodist.client import ParameterServerClient

SHAPES = {"layer0/w": (64, 32), "layer0/b": (32,), "layer1/w": (32, 10), "emb": (300_000,)}


def gradient(worker: int, step: int, key: str) -> np.ndarray:
    seed = [worker, step, sorted(SHAPES).index(key)]
    return np.random.default_rng(seed).standard_normal(SHAPES[key])


def main() -> None:
    addresses, worker, steps = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    with ParameterServerClient(addresses, worker_id=worker, chunk_bytes=1 << 20) as client:
        for step in range(steps):
            client.push({k: gradient(worker, step, k) for k in SHAPES}, step=step)
            values = client.pull(SHAPES, min_version=step + 1, timeout_ms=20_000)
            assert all(v == step + 1 for v in values.versions.values()), values.versions


if __name__ == "__main__":
    main()
