"""nd.elastic: a training function that survives workers leaving and joining, as Horovod Elastic's.

    state = nd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0)

    @nd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, epochs):
            sampler.set_epoch(state.epoch)
            for i, (x, y) in enumerate(loader):  # a DataLoader over the ElasticSampler
                ...
                sampler.record_batch(i, batch_size)
                if i % 10 == 9:
                    state.commit()

    train(state)

Launched with `nanodist run --elastic --groups tcp:N`. When a worker is lost,
every survivor rolls its state back to the last commit, the survivors form the
next generation (new ranks, a new TCP group), take the new rank 0's state, and
call the function again; the sampler hands out what is left of the epoch over
the new membership. A worker started later waits until the next commit and
enters with a new generation the same way, without the roll-back.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Iterator, Sized
from typing import Any, TypeVar

import numpy as np
import torch

import nanodist.torch.runtime as runtime
from nanodist.client import BarrierBroken
from nanodist.torch.broadcast import broadcast_optimizer_state, broadcast_parameters
from nanodist.workers.comm import CommError
from nanodist.workers.job import Job

T = TypeVar("T")


class MembershipChanged(Exception):
    """Raised by commit() when workers joined: run() starts the function again in the new generation."""


class ElasticSampler(torch.utils.data.Sampler[int]):
    """A DistributedSampler whose shard follows the membership: after a change it hands out only the
    samples of the epoch that no worker has trained on yet, split over the workers there are now.

    The epoch's order is a permutation (or 0..n-1 without shuffle); the workers always take it from the
    front, rank r every size-th sample, so what they trained on is a prefix of it. A tail shorter than the
    number of workers is left out, so that every worker takes the same number of batches.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0) -> None:
        self.length = len(dataset)
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.offset = 0  # samples of this epoch's order trained on before the last change of membership
        self.done = 0  # samples of its shard this worker has trained on since then (record_batch)
        self.rank, self.size = runtime.rank(), runtime.size()

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (a new order); the epoch in progress keeps its place."""
        if epoch != self.epoch:
            self.epoch, self.offset, self.done = epoch, 0, 0

    def record_batch(self, batch_index: int, batch_size: int) -> None:
        """Mark the batches up to `batch_index` of this pass over the sampler as trained on."""
        self.done = min(len(self), (batch_index + 1) * batch_size)

    def reshard(self, rank: int, size: int) -> None:
        """Split what is left of the epoch over `size` workers; this one is `rank`."""
        self.offset += self.done * self.size
        self.done = 0
        self.rank, self.size = rank, size

    @property
    def processed_indices(self) -> set[int]:
        """The samples of this epoch trained on, as this worker's state has it: every worker's before the
        last change of membership, and this worker's since (Horovod's name). A rollback to a commit, or a
        sync to rank 0's state, forgets the samples trained on after it."""
        order = self._order()
        return set(order[: self.offset].tolist()) | set(self._shard()[: self.done].tolist())

    def _order(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng(self.seed + self.epoch).permutation(self.length)
        return np.arange(self.length)

    def _shard(self) -> np.ndarray:
        left = self._order()[self.offset :]
        usable = len(left) // self.size * self.size
        return left[self.rank : usable : self.size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard().tolist())

    def __len__(self) -> int:
        return (self.length - self.offset) // self.size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "done": self.done, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset, self.done, self.size = (state[k] for k in ("epoch", "offset", "done", "size"))


class TorchState:
    """What a worker rolls back to and shares with newcomers: the model, the optimizer, ElasticSamplers,
    and any other values given by keyword (as attributes: state.epoch). The values travel as JSON, so
    they are numbers, strings, lists and dicts; nothing is unpickled."""

    def __init__(
        self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, **values: Any
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self._names = list(values)
        for name, value in values.items():
            setattr(self, name, value)
        self._callbacks: list[Callable[[], None]] = []
        self._saved: dict[str, Any] = {}
        self._save()

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        """Call these after every change of membership (to scale a learning rate with nd.size(), say)."""
        self._callbacks.extend(callbacks)

    def commit(self) -> None:
        """Keep the current state as the one to roll back to, and let waiting workers in."""
        self._save()
        job = runtime.job()
        if job is not None and job.config.elastic and job.admit_joiners():
            raise MembershipChanged

    def restore(self) -> None:
        """Go back to the last commit."""
        if self.model is not None:
            self.model.load_state_dict(self._saved["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._saved["optimizer"]))
        self._load_values(copy.deepcopy(self._saved["values"]))

    def sync(self) -> None:
        """Every worker takes rank 0's state."""
        job = runtime.job()
        if job is None or job.world == 1:
            return
        key = f"{job.config.run_id}/torch/elastic/gen-{job.generation}"
        if self.model is not None:
            broadcast_parameters(job, self.model.state_dict(), root_rank=0, name=f"{key}/model")
        if self.optimizer is not None:
            broadcast_optimizer_state(job, self.optimizer, root_rank=0, name=f"{key}/optimizer")
        if job.rank == 0:
            job.kv.set(f"{key}/values", json.dumps(self._values()))
        else:
            job.kv.wait([f"{key}/values"], timeout=job.config.timeout)
            self._load_values(json.loads(job.kv.get(f"{key}/values")))

    def _save(self) -> None:
        self._saved = {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.model is not None
            else {},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else {},
            "values": copy.deepcopy(self._values()),
        }

    def _samplers(self) -> dict[str, ElasticSampler]:
        return {n: v for n in self._names if isinstance(v := getattr(self, n), ElasticSampler)}

    def _values(self) -> dict[str, Any]:
        samplers = self._samplers()
        return {n: samplers[n].state_dict() if n in samplers else getattr(self, n) for n in self._names}

    def _load_values(self, values: dict[str, Any]) -> None:
        samplers = self._samplers()
        for name, value in values.items():
            if name in samplers:
                samplers[name].load_state_dict(value)
            else:
                setattr(self, name, value)

    def _enter(self, job: Job) -> None:
        """Take rank 0's state and split the rest of the epoch over this generation."""
        self.sync()
        for sampler in self._samplers().values():
            sampler.reshard(job.rank, job.world)


def run(train: Callable[..., T]) -> Callable[..., T]:
    """Decorate `train(state, ...)` so that it goes on through changes of membership (see the module)."""

    @functools.wraps(train)
    def elastic(state: TorchState, *args: Any, **kwargs: Any) -> T:
        job = runtime.job()
        if job is None:
            return train(state, *args, **kwargs)  # alone: nothing can change
        changed = False
        while True:
            try:
                state._enter(job)
                if changed:
                    for callback in state._callbacks:
                        callback()
                result = train(state, *args, **kwargs)
                job.finished()
                return result
            except MembershipChanged:
                runtime.adopt_generation()  # joiners entered at a commit: nothing to roll back
            except (CommError, BarrierBroken) as error:
                if not job.config.elastic:
                    raise
                state.restore()
                job.regroup_after_loss(
                    str(error), before=runtime.adopt_generation, in_group=isinstance(error, CommError)
                )
                runtime.adopt_generation()
            changed = True

    return elastic


__all__ = ["ElasticSampler", "MembershipChanged", "TorchState", "run"]
