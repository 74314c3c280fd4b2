"""The single-process reference that synchronous distributed training must match."""

import numpy as np

from nanodist.workers.data import ShardSampler, load_digits
from nanodist.workers.models import MLP


def assert_matches_single_process(
    dump, sizes: tuple[int, ...], *, shards: int, steps: int, lr: float, batch: int, seed: int
) -> None:
    """Train `sizes` in one process on the combined batches of `shards` data shards (epoch 1, as the
    workers do) and compare with the parameters a run saved with --dump-params."""
    data = load_digits(seed=seed)
    model = MLP(sizes)
    params = model.init(seed)
    samplers = [ShardSampler(len(data.y_train), r, shards, seed=seed) for r in range(shards)]
    for t in range(steps):
        combined = np.concatenate([s.batches(1, batch)[t] for s in samplers])
        _, grads = model.loss_and_grads(params, data.x_train[combined], data.y_train[combined])
        params = {k: v - np.float32(lr) * grads[k] for k, v in params.items()}
    with np.load(dump, allow_pickle=False) as trained:
        for key, expected in params.items():
            np.testing.assert_allclose(trained[key.replace("/", ".")], expected, rtol=1e-4, atol=2e-6, err_msg=key)
