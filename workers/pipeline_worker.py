"""`nanodist worker --pipeline-stages K`: each worker is one stage of one pipeline replica.

A group of K ranks (TCP or MPI) is one replica of the model, rank s holding
stage s. Every stage pushes its own gradients to the parameter server under
stage-scoped keys (`stage<s>/layer<i>/w`) and pulls its own new parameters, so
with D replicas (D groups) stage s of every replica shares keys, and the
servers' BSP mean over the D pushes is the data-parallel average. Replicas
read disjoint shards of the data; the stages of one replica read the same
batches (stage 0 the inputs, the last stage the labels).
"""

from __future__ import annotations

import numpy as np

from nanodist.client import ClientSecurity, sgd
from nanodist.workers.config import ConfigError, TrainConfig
from nanodist.workers.data import ShardSampler
from nanodist.workers.flat_buffer import FlatBuffer
from nanodist.workers.model_parallel import Pipeline, Schedule, split_layers, stage_key
from nanodist.workers.models import Params
from nanodist.workers.worker import Worker


class PipelineWorker(Worker):
    every_rank_pushes = True  # each stage pushes its own keys

    def __init__(self, config: TrainConfig, security: ClientSecurity | None = None) -> None:
        super().__init__(config, security)
        c = config
        self.stage = self.comm.rank
        try:
            self.sampler = ShardSampler(len(self.data.y_train), c.group_id, c.num_groups, seed=c.seed)
            self.pipeline = Pipeline(
                self.comm, self.model, c.micro_batches, Schedule(c.schedule), list(c.pipeline_split) or None
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.replicas = c.num_groups
        self.names = self.pipeline.param_names()
        full = self.model.init(c.seed)
        shapes = {stage_key(self.stage, n): full[n].shape for n in self.names}
        self.params = FlatBuffer(shapes, np.dtype(self.model.dtype))
        self.grads = FlatBuffer(shapes, np.dtype(self.model.dtype))
        # The pipeline reads and writes layer names; these are views of the same memory.
        self.stage_params: Params = {n: self.params.views[stage_key(self.stage, n)] for n in self.names}
        self.name = f"replica {c.group_id} stage {self.stage}"

    def initialise(self) -> None:
        """Each stage creates its own keys (first writer wins: every replica offers the same values)."""
        assert self.ps is not None
        full = self.model.init(self.config.seed)
        self.ps.init({stage_key(self.stage, n): full[n] for n in self.names}, sgd(self.config.learning_rate))
        self.params.load(self.ps.pull(self.params.views))

    def _step(self, t: int, x: np.ndarray, y: np.ndarray) -> float:
        assert self.ps is not None
        with self.timer("pipeline"):
            loss, grads = self.pipeline.step(self.stage_params, x, y)
        self.grads.load({stage_key(self.stage, n): g for n, g in grads.items()})
        with self.timer("push"):
            self.ps.push(self.grads.views, step=t)
        with self.timer("pull"):
            self.params.load(self._pull_watching_peers(t))
        self.timer.steps += 1
        return loss

    def full_params(self) -> dict[str, np.ndarray]:
        """Every stage's parameters, pulled from the servers, by layer name."""
        assert self.ps is not None
        stages = split_layers(self.model.sizes, self.config.pipeline_stages, list(self.config.pipeline_split) or None)
        keys = {stage_key(s, f"layer{i}/{p}"): f"layer{i}/{p}" for s, r in enumerate(stages) for i in r for p in "wb"}
        values = self.ps.pull(list(keys))
        return {name: np.array(values[key]) for key, name in keys.items()}

    def timings(self) -> dict[str, float]:
        t = self.pipeline.timings
        steps = max(1, t.steps)
        return {
            **self.timer.summary(),
            "stage": self.stage,
            "stage_compute_ms_per_step": round(t.compute / steps * 1000, 4),
            "stage_comm_ms_per_step": round(t.comm / steps * 1000, 4),
            "bubble": round(1 - t.compute / t.wall, 4) if t.wall else 0.0,
            "peak_micro_batches_held": self.pipeline.peak_cached,
        }

    def layout(self) -> str:
        c = self.config
        return f"{c.num_groups} x {c.pipeline_stages}-stage pipeline, {c.micro_batches} micro-batches, {c.schedule}"
