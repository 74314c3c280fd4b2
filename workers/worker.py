"""The data-parallel training worker behind `nanodist worker`.

Hierarchical mode (the default): the workers of a group allreduce their
gradients (MEAN), the group leader pushes the group's gradient to the
parameter-server shards and pulls the new parameters, then broadcasts them to
its group. Flat mode: every worker pushes and pulls on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nanodist.client import (
    BarrierBroken,
    ClientSecurity,
    LockClient,
    NotFound,
    Values,
    sgd,
)
from nanodist.workers.comm import CommError, ReduceOp
from nanodist.workers.config import ConfigError, TrainConfig
from nanodist.workers.data import ShardSampler, load_digits
from nanodist.workers.flat_buffer import FlatBuffer
from nanodist.workers.job import Job
from nanodist.workers.models import MLP
from nanodist.workers.progress import Progress, say
from nanodist.workers.report import plot_training, write_metrics
from nanodist.workers.timing import PhaseTimer


@dataclass
class Position:
    """Where training is: the epoch (from 1), the next batch of it, and the global step."""

    epoch: int = 1
    batch: int = 0
    step: int = 0


@dataclass
class _State:
    """What the evaluator records while training."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    clocks: list[tuple[int, int]] = field(default_factory=list)  # (own clock, slowest clock seen)


class Worker:
    """One rank of a data-parallel job; `security` secures every channel it opens (None: NANODIST_TLS_*)."""

    every_rank_pushes = False  # only the group leader talks to the servers

    def __init__(self, config: TrainConfig, security: ClientSecurity | None = None) -> None:
        config.validate()
        self.config = config
        self.security = security
        self.timer = PhaseTimer()
        self.state = _State()
        self.data = load_digits(seed=config.seed)
        self.job = Job(config, security, every_rank_pushes=self.every_rank_pushes, check=self._check_data)
        self._adopt_job()
        self.model = MLP((self.data.features, *config.hidden, self.data.classes))
        shapes = {k: v.shape for k, v in self.model.init(config.seed).items()}
        self.params = FlatBuffer(shapes, np.dtype(self.model.dtype))
        self.grads = FlatBuffer(shapes, np.dtype(self.model.dtype))

    def _check_data(self, rank: int, world: int) -> None:
        """Every worker gets a shard of the training data with at least one full batch."""
        try:
            self.sampler = ShardSampler(len(self.data.y_train), rank, world, seed=self.config.seed)
            self.sampler.batches(0, self.config.batch_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def _barrier_name(self) -> str:
        return self.job.barrier_name

    # --- set-up ---------------------------------------------------------

    def initialise(self) -> None:
        """Rank 0 creates the keys (first writer wins); the others wait for them, then pull."""
        ready_key = f"{self.config.run_id}/initialized"
        if self.rank == 0:
            assert self.ps is not None
            self.ps.init(self.model.init(self.config.seed), sgd(self.config.learning_rate))
            self.kv.set(ready_key, "1")
        else:
            self.kv.wait([ready_key], timeout=self.config.timeout)
        if self.ps is not None:
            self.params.load(self.ps.pull(self.params.views))
        if not self.config.flat:
            self.comm.broadcast(self.params.data, root=0)

    # --- training -------------------------------------------------------

    def step(self, t: int, x: np.ndarray, y: np.ndarray) -> float:
        with self.timer("step"):
            return self._step(t, x, y)

    def _step(self, t: int, x: np.ndarray, y: np.ndarray) -> float:
        c = self.config
        with self.timer("compute"):
            loss, grads = self.model.loss_and_grads(self.params.views, x, y)
            self.grads.load(grads)
            if c.slow_ms:
                time.sleep(c.slow_ms / 1000)
        if not c.flat:
            with self.timer("allreduce"):
                self.comm.allreduce(self.grads.data, ReduceOp.MEAN)
                if self.push_scale != 1.0:
                    self.grads.data *= self.push_scale
        if self.ps is not None:
            try:
                with self.timer("push"):
                    self.ps.push(self.grads.views, step=t)
                with self.timer("pull"):
                    values = self._pull_watching_peers(t)
                    self.params.load(values)
            except BarrierBroken:
                if c.elastic and not c.flat:
                    self.job.tell_group(going_on=False)
                raise
            self.state.clocks.append((t + 1, values.slowest_clock))
        if not c.flat:
            with self.timer("broadcast"):
                if c.elastic:
                    self.job.tell_group(going_on=True)
                self.comm.broadcast(self.params.data, root=0)
        self.timer.steps += 1
        return loss

    def _pull_watching_peers(self, t: int) -> Values:
        mode = self.config.mode
        return self.job.pull_watching_peers(
            list(self.params.views),
            min_version=t + 1 if mode == "bsp" else 0,
            clock=t + 1 if mode == "ssp" else 0,
            out=self.params.views,
        )

    def abort(self, reason: str) -> None:
        """Break the epoch barrier so that the other groups stop at once, naming the cause."""
        self.job.abort(reason)

    def train(self) -> None:
        at = Position()
        lost: CommError | BarrierBroken | None = None  # elastic: the loss the next generation follows
        if self.job.joined_late:
            self._resume(at)  # the group's leader hands over the parameters and where training is
        else:
            self.initialise()
        while True:
            try:
                if lost is not None:
                    self._rejoin(lost, at)  # another loss while it regroups starts it again
                    lost = None
                self._train(at)
                break
            except (CommError, BarrierBroken) as error:
                if not self.config.elastic:
                    raise
                lost = error
        self.job.finished()
        self._finish()

    def _train(self, at: Position) -> None:
        """Train from `at` to the end, moving `at` along with every step taken."""
        c = self.config
        while at.epoch <= c.epochs:
            began = time.perf_counter()
            losses = []
            batches = self.sampler.batches(at.epoch, c.batch_size)
            progress = Progress(f"[{self.name}] epoch {at.epoch}/{c.epochs}", len(batches))
            if at.batch:
                progress.update(at.batch)  # resumed inside the epoch
            samples = 0
            for batch in batches[at.batch :]:
                losses.append(self.step(at.step, self.data.x_train[batch], self.data.y_train[batch]))
                at.step += 1
                at.batch += 1
                samples += len(batch) * self.replicas
                rate = samples / max(1e-9, time.perf_counter() - began)
                progress.update(status=f"loss {losses[-1]:.4f} {rate:.0f} samples/s")
                if c.max_steps and at.step >= c.max_steps:
                    break
            progress.close()
            with self.timer("wait"):
                self.barrier.wait(self._barrier_name, self.world, timeout=c.timeout)
            if self.rank == 0:
                self._evaluate(
                    at.epoch, float(np.mean(losses)) if losses else float("nan"), time.perf_counter() - began
                )
            at.epoch, at.batch = at.epoch + 1, 0
            if c.max_steps and at.step >= c.max_steps:
                break
            if c.elastic and at.epoch <= c.epochs:
                self._admit_joiners(at)

    def _rejoin(self, error: CommError | BarrierBroken, at: Position) -> None:
        """Elastic: form the next generation with the workers left, then continue from the servers' step."""
        self.job.regroup_after_loss(str(error), in_group=isinstance(error, CommError))
        self._resume(at)

    def _admit_joiners(self, at: Position) -> None:
        """Elastic, at an epoch boundary: workers waiting to join enter with a new generation."""
        if self.job.admit_joiners():
            self._resume(at)

    def _resume(self, at: Position) -> None:
        """After a new generation formed: its leader pulls the parameters and their version (the steps
        the servers applied) and hands both to the group with its place in the epoch, whose remaining
        batches are re-sharded over the new membership."""
        self._adopt_job()
        self._check_data(self.rank, self.world)
        c = self.config
        if self.rank == 0:
            with contextlib.suppress(NotFound):  # none before the first epoch's end
                self.state.epochs = json.loads(self.kv.get(f"{c.run_id}/evaluations"))
        values = self.ps.pull(list(self.params.views)) if self.ps is not None else None
        if values is not None:
            self.params.load(values)
        position = f"{c.run_id}/position/gen-{self.job.generation}"  # rank 0's, for every group
        if self.rank == 0:
            assert values is not None  # rank 0 leads the first group: it talks to the servers
            applied = min(values.versions.values())
            self.kv.set(position, json.dumps([applied, at.epoch, at.batch + applied - at.step]))  # servers may be ahead
        self.job.watching_peers(lambda slice_ms: self.kv.wait([position], timeout=slice_ms / 1000))
        if not c.flat:
            self.comm.broadcast(self.params.data, root=0)
        at.step, at.epoch, at.batch = json.loads(self.kv.get(position))
        say(f"[{self.name}] generation {self.job.generation}: resuming at step {at.step}, epoch {at.epoch}")

    def _adopt_job(self) -> None:
        """Take the job's view of this worker after a regroup: group, rank, world and clients."""
        self.kv, self.comm, self.ps, self.barrier = self.job.kv, self.job.comm, self.job.ps, self.job.barrier
        self.world, self.rank, self.push_scale = self.job.world, self.job.rank, self.job.push_scale
        self.replicas = self.world
        self.is_leader, self.pushes = self.job.is_leader, self.job.pushes
        self.name = f"rank {self.rank}"

    def _evaluate(self, epoch: int, train_loss: float, seconds: float) -> None:
        with (
            LockClient(self.config.lock, f"{self.config.run_id}/rank-0", security=self.security) as locks,
            locks.lock(f"{self.config.run_id}/eval", ttl=30) as held,
        ):
            test_loss, accuracy = self.model.evaluate(self.full_params(), self.data.x_test, self.data.y_test)
            record = {
                "epoch": epoch,
                "train_loss": round(train_loss, 6),
                "test_loss": round(test_loss, 6),
                "test_accuracy": round(accuracy, 6),
                "seconds": round(seconds, 3),
                "eval_fencing_token": held.fencing_token,
            }
        self.state.epochs.append(record)
        if self.config.elastic:  # whoever leads a later generation reports these too
            self.kv.set(f"{self.config.run_id}/evaluations", json.dumps(self.state.epochs))
        say(
            f"[{self.name}] epoch {epoch}: train loss {train_loss:.4f}, test loss {test_loss:.4f}, "
            f"test accuracy {accuracy:.4f}"
        )

    def _finish(self) -> None:
        c = self.config
        mine = {"timings": self.timings(), "clocks": self.state.clocks if self.pushes else []}
        self.kv.set(f"{c.run_id}/report/{self.rank}", json.dumps(mine))
        if c.dump_params and self.rank == 0:
            arrays = {k.replace("/", "."): v for k, v in self.full_params().items()}
            np.savez(c.dump_params, allow_pickle=False, **arrays)
        if self.rank != 0:
            return
        keys = [f"{c.run_id}/report/{r}" for r in range(self.world)]
        self.kv.wait(keys, timeout=c.timeout)
        reports = {r: json.loads(self.kv.get(k)) for r, k in enumerate(keys)}
        run_dir = os.path.join(c.runs_dir, c.run_id)
        config = asdict(c)
        metrics = {
            "run_id": c.run_id,
            "config": config,
            "world_size": self.world,
            "epochs": self.state.epochs,
            "final_test_accuracy": self.state.epochs[-1]["test_accuracy"] if self.state.epochs else None,
            "timings": {
                "per_worker": {r: rep["timings"] for r, rep in reports.items()},
                "mean_ms_per_step": _mean_per_step([rep["timings"] for rep in reports.values()]),
            },
            "clocks": {r: rep["clocks"] for r, rep in reports.items() if rep["clocks"]},
        }
        path = write_metrics(run_dir, metrics)
        plot = plot_training(
            run_dir,
            self.state.epochs,
            f"nanodist {c.run_id}: {self.world} workers, {c.mode.upper()}, {self.layout()}",
        )
        say(f"[{self.name}] wrote {path} and {plot}")

    def full_params(self) -> dict[str, np.ndarray]:
        """The whole model, by layer name (for evaluation and --dump-params)."""
        return self.params.views

    def timings(self) -> dict[str, float]:
        return self.timer.summary()

    def layout(self) -> str:
        return "flat" if self.config.flat else "hierarchical"

    def close(self) -> None:
        self.job.close()


def _mean_per_step(timings: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in timings[0] if k.endswith("_ms_per_step")]
    return {k.removesuffix("_ms_per_step"): round(float(np.mean([t[k] for t in timings])), 4) for k in keys}
