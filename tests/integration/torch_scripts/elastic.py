"""A user script under nd.elastic.run: an MLP on scikit-learn's digits through an ElasticSampler.

argv: OUT_DIR EPOCHS [SECONDS_PER_BATCH (a pause, 0.02 by default: a kill lands inside an epoch) [GATE]]
With GATE, a path, the worker starts (torch imported, data loaded) but joins only once GATE exists.
Each worker writes its pid to OUT_DIR/pid-<first rank> once it has joined; each worker that finishes
writes its parameters to OUT_DIR/worker-<pid>.npz and the samples it trained on per epoch to
OUT_DIR/samples-<pid>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import nanodist.torch as nd

BATCH = 16


def main() -> None:
    out, epochs = sys.argv[1], int(sys.argv[2])
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
    if len(sys.argv) > 4:
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.05)
    nd.init()
    with open(os.path.join(out, f"pid-{nd.rank()}"), "w") as f:
        f.write(str(os.getpid()))
    torch.manual_seed(nd.rank())  # different local inits: the state's first sync makes them equal
    digits = load_digits()
    dataset = TensorDataset(torch.tensor(digits.data / 16, dtype=torch.float32), torch.tensor(digits.target))
    sampler = nd.elastic.ElasticSampler(dataset, seed=1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = nd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), named_parameters=model.named_parameters()
    )
    state = nd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0)
    trained: dict[int, list[int]] = {}  # epoch -> the samples this worker trained on (and kept)

    def forget_rolled_back() -> None:
        """After a loss every worker takes rank 0's last commit, which may be older than this worker's: what
        it trained on since is trained on again, by whoever the sampler now gives it to."""
        for epoch in [e for e in trained if e > state.epoch]:
            del trained[epoch]
        kept = sampler.processed_indices
        trained[state.epoch] = [i for i in trained.get(state.epoch, []) if i in kept]
        print(f"reset: rank {nd.rank()} of {nd.size()}", flush=True)

    state.register_reset_callbacks([forget_rolled_back])

    @nd.elastic.run
    def train(state: nd.elastic.TorchState) -> None:
        for state.epoch in range(state.epoch, epochs):  # noqa: B020 - Horovod Elastic's idiom: resumes at the epoch
            sampler.set_epoch(state.epoch)
            mine = trained.setdefault(state.epoch, [])
            pending: list[int] = []  # trained on since the last commit: lost if the step is rolled back
            for i, batch in enumerate(DataLoader(range(len(dataset)), batch_size=BATCH, sampler=sampler)):
                x, y = dataset[batch]
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                sampler.record_batch(i, BATCH)
                pending += batch.tolist()
                time.sleep(pause)
                if i % 4 == 3:
                    mine += pending  # before commit(), which may go on in a new generation
                    pending = []
                    state.commit()
                print(f"epoch {state.epoch} batch {i}: rank {nd.rank()} of {nd.size()}", flush=True)
            mine += pending
            state.commit()

    train(state)
    with torch.no_grad():
        accuracy = float((model(dataset.tensors[0]).argmax(1) == dataset.tensors[1]).float().mean())
    print(f"finished: rank {nd.rank()} of {nd.size()}, accuracy {accuracy:.4f}", flush=True)
    np.savez(os.path.join(out, f"worker-{os.getpid()}.npz"), **{k: v.numpy() for k, v in model.state_dict().items()})
    with open(os.path.join(out, f"samples-{os.getpid()}.json"), "w") as f:
        json.dump(trained, f)
    nd.shutdown()


if __name__ == "__main__":
    main()
