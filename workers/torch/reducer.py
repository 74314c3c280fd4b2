"""Averages gradients over every worker, bucket by bucket, while backward still runs.

A hook on each parameter (register_post_accumulate_grad_hook) copies its
gradient into its bucket; a full bucket is handed to the communication
thread at once, so the exchange overlaps the rest of backward, as in DDP.
Buckets start in index order on every rank, because collectives must be
called in the same order everywhere. One bucket's exchange:

1. inside the group, an allreduce (MEAN) over MPI or TCP;
2. with more than one group, or in flat mode, the workers that talk to the
   parameter servers push the bucket and pull the average of every pusher
   (a BSP step on a key whose update rule is AVERAGE); the pull runs on a
   second thread, so it overlaps the next bucket's allreduce;
3. the group leader broadcasts the result to its group.

In server-optimizer mode the servers apply the update rule instead, and the
pull brings back parameters rather than an average gradient.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from nanodist.torch.buckets import Bucket, Slot
from nanodist.torch.compression import Compression
from nanodist.torch.departures import RankLeft
from nanodist.workers.comm import ReduceOp
from nanodist.workers.job import Job


@dataclass(frozen=True)
class Route:
    """Which stages a bucket's exchange takes, decided once from the job's shape."""

    group_reduce: bool  # allreduce inside the group
    via_servers: bool  # push to and pull from the parameter servers
    group_broadcast: bool  # the leader hands the servers' answer to its group
    pushes: bool  # this worker talks to the servers

    @classmethod
    def of(cls, job: Job, server_side: bool) -> Route:
        flat, group = job.config.flat, job.comm.size
        via_servers = server_side or flat or len(job.group_sizes) > 1
        return cls(
            group_reduce=not flat and group > 1,
            via_servers=via_servers,
            group_broadcast=via_servers and not flat and group > 1,
            pushes=job.pushes,
        )


# The unit of a bucket's trip to the servers. Smaller pieces would overlap more, but on 2 cores shared by
# 4 workers and 4 servers their per-call costs outweighed the overlap (bench/torch_step.py).
PIECE_BYTES = 64 << 20
WATCH_EVERY_S = 0.5  # how often a waiting step asks whether a rank left


def _pieces(total: int, per_piece: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `per_piece` elements covering `total` (one range if empty)."""
    return [(a, min(a + per_piece, total)) for a in range(0, max(total, 1), per_piece)]


class Target(Enum):
    """What the exchange's result becomes."""

    GRAD = "grad"  # the average gradient, for the wrapped optimizer
    PARAM = "param"  # parameters updated by the servers' optimizer
    VALUE = "value"  # the tensor itself, averaged (buffers such as BatchNorm statistics)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a host tensor (bfloat16 through ml_dtypes, which numpy lacks)."""
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class Reducer:
    def __init__(
        self,
        job: Job,
        buckets: list[Bucket],
        key_prefix: str,
        *,
        compression: Compression = Compression.none,
        backward_passes_per_step: int = 1,
        target: Target = Target.GRAD,
        mode: str = "bsp",
        watch: Callable[[int], str | None] | None = None,
        source: int | None = None,
    ) -> None:
        self.job = job
        self.watch = watch  # while a step waits: why step n cannot complete (a rank left), or None
        self.buckets = buckets
        # Each bucket travels in pieces, so that one piece's trip to the servers overlaps the next
        # piece's allreduce and the previous piece's broadcast.
        self.pieces = [_pieces(b.buffer.numel(), PIECE_BYTES // b.buffer.element_size()) for b in buckets]
        self.key_prefix = key_prefix
        self.keys = self._keys()
        self.route = Route.of(job, server_side=target is Target.PARAM)
        self.target = target
        self.mode = mode
        self.passes_per_step = backward_passes_per_step
        # Compressed copies: one the group reduces, one that travels to the servers (the same when they can be).
        mpi = job.config.backend == "mpi"
        self.group_wire = [self._buffer(b, compression.group_dtype(b.dtype, mpi)) for b in buckets]
        self.ps_wire = [
            g if g.dtype == compression.wire_dtype(b.dtype) else self._buffer(b, compression.wire_dtype(b.dtype))
            for b, g in zip(buckets, self.group_wire, strict=True)
        ]
        self._where: dict[torch.Tensor, tuple[Bucket, Slot]] = {}
        self._passes: dict[Slot, int] = {}
        for bucket in buckets:
            for slot in bucket.slots:
                self._where[slot.param] = (bucket, slot)
        self._lock = threading.Lock()
        self._next = 0  # the next bucket to start; buckets start in index order
        self._comm = job.collectives()
        # Two pieces in flight to the servers keep two shards busy.
        self._servers = ThreadPoolExecutor(2, thread_name_prefix="nanodist-ps")
        self._stage1: list[Future[list[Future[None]]]] = []
        self._lost: Exception | None = None
        self.step = 0
        self.joined = False  # nd.join: this rank ran out of data and contributes zeros, counted as no one
        self.paused = False  # DDP's no_sync(): gradients accumulate locally and travel with the next backward
        # Values only: the rank whose values every rank gets (a broadcast through the same averaging: the
        # others contribute nothing, and the average is scaled to the one contributor).
        self.source = source
        self.contributors = job.world  # how many ranks contributed to the last step (see buckets.py)
        hooked = target is not Target.VALUE  # values have no gradients: synchronize() gathers them
        self._hooks = [
            s.param.register_post_accumulate_grad_hook(self._on_grad) for b in buckets for s in b.slots if hooked
        ]
        self._reset()

    def _keys(self) -> list[list[str]]:
        """The servers' key of each piece of each bucket. An elastic job's keys belong to a generation:
        a new one starts its steps from 0 on fresh keys, whatever the old one left half done."""
        suffix = f"/gen-{self.job.generation}" if self.job.config.elastic and self.job.generation else ""
        return [
            [f"{self.key_prefix}{suffix}/{b.index}.{i}" for i in range(len(p))]
            for b, p in zip(self.buckets, self.pieces, strict=True)
        ]

    @staticmethod
    def _buffer(bucket: Bucket, dtype: torch.dtype) -> torch.Tensor:
        return bucket.buffer if dtype == bucket.dtype else torch.zeros_like(bucket.buffer, dtype=dtype)

    # --- gradients arrive ----------------------------------------------

    @property
    def contributes(self) -> bool:
        return not self.joined and (self.source is None or self.source == self.job.rank)

    def _on_grad(self, param: torch.Tensor) -> None:
        if self.paused:
            return
        bucket, slot = self._where[param]
        with self._lock:
            self._passes[slot] = self._passes.get(slot, 0) + 1
            if self._passes[slot] < self.passes_per_step:
                return
            if self._passes[slot] > self.passes_per_step:
                raise RuntimeError(
                    f"{slot.name}: more backward passes than backward_passes_per_step={self.passes_per_step} "
                    "before step(); raise backward_passes_per_step or call step() in between"
                )
            self._fill(bucket, slot, param.grad)
            bucket.ready += 1
            self._start_ready()

    def _fill(self, bucket: Bucket, slot: Slot, grad: torch.Tensor | None) -> None:
        view = bucket.view(slot)
        if grad is None:
            view.zero_()
            return
        view.copy_(grad)  # any layout or device: copy_ handles strides and stages through host memory
        if self.passes_per_step > 1 and self.target is not Target.VALUE:
            view.div_(self.passes_per_step)
        bucket.buffer[slot.presence] = 1

    def _start_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].slots):
            bucket = self.buckets[self._next]
            bucket.buffer[bucket.active] = 1 if self.contributes else 0
            self._stage1.append(self._comm.submit(self._reduce, bucket, self.step))
            self._next += 1

    # --- the exchange --------------------------------------------------

    def _reduce(self, bucket: Bucket, step: int) -> list[Future[None]]:
        """Communication thread: compress, reduce each piece in the group, hand it to the server threads."""
        wire = self.group_wire[bucket.index]
        if wire is not bucket.buffer:
            wire.copy_(bucket.buffer)
        trips = []
        for piece, (a, b) in enumerate(self.pieces[bucket.index]):
            if self.route.group_reduce:
                self.job.comm.allreduce(as_numpy(wire[a:b]), ReduceOp.MEAN)
            if self.route.via_servers and self.route.pushes:
                trips.append(self._servers.submit(self._exchange, bucket, piece, step))
        return trips

    def _exchange(self, bucket: Bucket, piece: int, step: int) -> None:
        """Server thread: push this worker's (group's) piece, pull the result of the step."""
        a, b = self.pieces[bucket.index][piece]
        group, travelling = self.group_wire[bucket.index][a:b], self.ps_wire[bucket.index][a:b]
        if travelling.dtype != group.dtype:
            travelling.copy_(group)
        key, data = self.keys[bucket.index][piece], as_numpy(travelling)
        scale = self.job.push_scale
        if scale != 1.0 and not self.job.config.flat:
            data *= scale
        self.job.client().push({key: data}, step=step)
        mode = self.mode
        self.job.pull_watching_peers(  # straight into the piece it pushed: no copy, no fresh memory
            [key], min_version=step + 1 if mode == "bsp" else 0, clock=step + 1 if mode == "ssp" else 0, out={key: data}
        )
        if travelling.dtype != group.dtype:
            group.copy_(travelling)

    def _finish(self, bucket: Bucket, stage1: Future[list[Future[None]]]) -> None:
        """Communication thread, in bucket order: as each piece comes back from the servers, share it in
        the group. In an elastic job the leader first tells its group whether the piece came back, so
        that on a loss every rank of the group leaves the step at the same piece (an MPI group's members
        would otherwise wait in the broadcast for ever); the step's later pieces are then skipped."""
        trips = stage1.result()
        wire = self.group_wire[bucket.index]
        elastic = self.job.config.elastic and self.route.group_broadcast
        for piece, (a, b) in enumerate(self.pieces[bucket.index]):
            if self._lost:
                raise self._lost
            try:
                if trips:
                    trips[piece].result()
            except Exception as error:
                if elastic:
                    self._lost = error
                    self.job.tell_group(going_on=False)
                raise
            if elastic:
                try:
                    self.job.tell_group(going_on=True)
                except Exception as error:
                    self._lost = error
                    raise
            if self.route.group_broadcast:
                self.job.comm.broadcast(as_numpy(wire[a:b]), root=0)
        if wire is not bucket.buffer:
            bucket.buffer.copy_(wire)

    def server_arrays(self, tensors: list[torch.Tensor]) -> dict[str, np.ndarray]:
        """Per-bucket tensors (buffers or wire copies) as the servers' keys: one numpy view per piece."""
        return {
            key: as_numpy(tensor[a:b])
            for tensor, keys, pieces in zip(tensors, self.keys, self.pieces, strict=True)
            for key, (a, b) in zip(keys, pieces, strict=True)
        }

    # --- the step ------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        """Whether a gradient of this step has arrived (so a step's exchange has begun)."""
        with self._lock:
            return bool(self._passes) or self._next > 0

    def synchronize(self) -> None:
        """Wait until every bucket is averaged; then write the results back to the parameters."""
        with self._lock:
            for bucket in self.buckets[self._next :]:
                for slot in bucket.slots:
                    if not self.contributes:
                        self._fill(bucket, slot, None)  # nothing from a rank that joined, or not the source
                    elif self.target is Target.VALUE:
                        self._fill(bucket, slot, slot.param)
                    elif self._passes.get(slot, 0) < self.passes_per_step:
                        self._fill(bucket, slot, None)  # no gradient on this rank this step
                bucket.ready = len(bucket.slots)
            self._start_ready()
        finishes = [self._comm.submit(self._finish, b, s) for b, s in zip(self.buckets, self._stage1, strict=True)]
        try:
            for done in finishes:
                self._await(done)
            for bucket in self.buckets:
                self._write_back(bucket)
        finally:
            self.step += 1
            self._reset()

    def _await(self, finish: Future[None]) -> None:
        """Wait for a bucket's exchange, asking the watch every half second whether it can still complete."""
        while not wait([finish], timeout=WATCH_EVERY_S).done:
            problem = self.watch(self.step) if self.watch is not None else None
            if problem is not None:
                raise RankLeft(problem)
        try:
            finish.result()
        except Exception:
            # A rank that left closes its sockets: the watch's account of it says more than a lost connection.
            problem = self.watch(self.step) if self.watch is not None else None
            if problem is not None:
                raise RankLeft(problem) from None
            raise

    def _write_back(self, bucket: Bucket) -> None:
        world = self.job.world
        # The average is over every rank; the ranks that joined gave zeros, so scale it to the contributors'.
        # (Parameters from the servers' optimizer are no average: their slot is a parameter of its own.)
        averaged = self.target is not Target.PARAM
        self.contributors = round(float(bucket.buffer[bucket.active]) * world) if averaged else world
        if self.contributors == 0 and self.target is Target.VALUE:
            return  # every rank has joined: nothing new to hold
        if 0 < self.contributors < world:
            bucket.buffer[: bucket.numel].mul_(world / self.contributors)
        for slot in bucket.slots:
            value, param = bucket.view(slot), slot.param
            if self.target is not Target.GRAD:
                with torch.no_grad():
                    param.copy_(value)
            elif float(bucket.buffer[slot.presence]) > 0:
                if param.grad is None:
                    param.grad = value.to(param.device, copy=True)
                else:
                    param.grad.copy_(value)
            else:
                param.grad = None  # no worker produced one: the optimizer skips it, as it would alone

    def adopt_generation(self) -> None:
        """Elastic, after the group re-formed: wait out the exchanges queued on the old group (they fail
        at once, as it is closed), forget the step they belonged to, and take the new group's shape."""
        for stage1 in self._stage1:
            with contextlib.suppress(Exception):
                for trip in stage1.result():
                    with contextlib.suppress(Exception):
                        trip.result()
        self._comm.submit(lambda: None).result()  # one thread, in order: whatever was queued has run
        self.route = Route.of(self.job, server_side=self.target is Target.PARAM)
        self.keys = self._keys()
        self.step = 0
        self._reset()

    def _reset(self) -> None:
        self._lost = None  # elastic: why this step's exchange stopped (see _finish)
        self._stage1 = []
        self._next = 0
        self._passes.clear()
        for bucket in self.buckets:
            bucket.reset()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._servers.shutdown(wait=True)
