"""nd.DistributedOptimizer: any torch optimizer, with gradients averaged over every worker.

As in Horovod, the returned object is an instance of a subclass of the
optimizer's own class that shares the wrapped optimizer's state, so LR
schedulers, state_dict() and isinstance checks keep working. step() waits
for the gradients still in flight (synchronize) and then runs the wrapped
optimizer's step; in server-optimizer mode the parameter servers apply the
update rule and step() only brings the new parameters back.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch

import nanodist.torch.departures as departures
import nanodist.torch.runtime as runtime
from nanodist.client import average
from nanodist.torch.buckets import DEFAULT_BUCKET_BYTES, assign
from nanodist.torch.compression import Compression
from nanodist.torch.reducer import Reducer, Target, as_numpy
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.workers.job import Job

_optimizers = itertools.count()  # every rank creates its optimizers in the same order


class ModelMismatch(ValueError):
    """Workers disagree on the model; the message names the first parameter that differs."""


class Synchronizer:
    """The distributed part of one DistributedOptimizer."""

    def __init__(
        self,
        job: Job,
        named: list[tuple[str, torch.Tensor]],
        buffers: list[tuple[str, torch.Tensor]],
        *,
        compression: Compression,
        backward_passes_per_step: int,
        bucket_bytes: int,
        server_optimizer: ps.Optimizer | None,
        mode: str,
        buffer_source: int | None = None,
    ) -> None:
        self.job = job
        self.index = next(_optimizers)  # the same on every rank: nd.join steps the optimizers in this order
        self.prefix = f"{job.config.run_id}/torch/optimizer-{self.index}"
        check_same_model(job, f"{self.prefix}/signature", named + buffers)
        self.server_side = server_optimizer is not None
        self.averaged = {id(p) for _, p in named}
        grads = assign(named, bucket_bytes)
        self.grads = Reducer(
            job,
            grads,
            f"{self.prefix}/{'params' if self.server_side else 'grads'}",
            compression=compression,
            backward_passes_per_step=backward_passes_per_step,
            target=Target.PARAM if self.server_side else Target.GRAD,
            mode=mode,
            watch=None if job.config.elastic else lambda step: departures.problem(job, step),
        )
        floats = [(n, b) for n, b in buffers if b.dtype.is_floating_point]
        self.buffers = Reducer(
            job, assign(floats, bucket_bytes), f"{self.prefix}/buffers", target=Target.VALUE, source=buffer_source
        )
        self._create_keys(server_optimizer)

    def _create_keys(self, server_optimizer: ps.Optimizer | None) -> None:
        """Create the servers' keys: average buffers, or the parameters with their update rule."""
        job = self.job
        if server_optimizer is not None:
            self._load_parameters(server_optimizer)
        for reducer in (self.grads, self.buffers):
            if reducer.route.via_servers and reducer.route.pushes and reducer.target is not Target.PARAM:
                job.client().init(reducer.server_arrays(reducer.ps_wire), average())

    def _load_parameters(self, server_optimizer: ps.Optimizer) -> None:
        """Rank 0's parameters become the servers' (first writer wins); everyone starts from them."""
        job, reducer = self.job, self.grads
        ready = f"{self.prefix}/params-ready"
        for bucket in reducer.buckets:
            for slot in bucket.slots:
                bucket.view(slot).copy_(slot.param.detach())
        if job.rank == 0:
            job.client().init(reducer.server_arrays([b.buffer for b in reducer.buckets]), server_optimizer)
            job.kv.set(ready, "1")
        job.kv.wait([ready], timeout=job.config.timeout)
        if job.ps is not None:
            targets = reducer.server_arrays([b.buffer for b in reducer.buckets])
            values = job.ps.pull(list(targets))
            for key, array in targets.items():
                array[:] = values[key]
        if not job.config.flat and job.comm.size > 1:
            for bucket in reducer.buckets:
                job.comm.broadcast(as_numpy(bucket.buffer), root=0)
        with torch.no_grad():
            for bucket in reducer.buckets:
                for slot in bucket.slots:
                    slot.param.copy_(bucket.view(slot))
        for bucket in reducer.buckets:
            bucket.reset()

    def check_trainable(self, param_groups: list[dict[str, Any]]) -> None:
        """Refuse a parameter that was frozen when the optimizer was wrapped and has a gradient now: its
        gradient would be this rank's own, and the ranks' models would drift apart without a word."""
        for group in param_groups:
            for param in group["params"]:
                if param.grad is not None and id(param) not in self.averaged:
                    raise RuntimeError(
                        f"a parameter of shape {list(param.shape)} has a gradient but was frozen (requires_grad="
                        "False) or unnamed when DistributedOptimizer wrapped the optimizer, so its gradient is not "
                        "averaged; wrap the optimizer again after unfreezing it"
                    )

    def synchronize(self) -> None:
        self.grads.synchronize()
        if self.buffers.buckets:
            self.buffers.synchronize()

    def set_joined(self, joined: bool) -> None:
        self.grads.joined = self.buffers.joined = joined

    def adopt_generation(self) -> None:
        """Elastic: continue in the job's new generation (see Reducer.adopt_generation)."""
        self.grads.adopt_generation()
        self.buffers.adopt_generation()
        self._create_keys(None)  # the new generation's (elastic jobs refuse server_optimizer=)

    def close(self) -> None:
        self.grads.close()
        self.buffers.close()


def check_same_model(job: Job, key: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """Every rank publishes its parameters' names, shapes and dtypes and compares them with every other
    rank's, so that all ranks fail at once, each naming the first difference, instead of hanging.
    A worker that joins an elastic job late compares its model with rank 0's, which the first generation
    checked: on a difference it alone fails, naming it, and the others go on without it."""
    mine = [[name, list(t.shape), str(t.dtype)] for name, t in named]
    others = [0] if job.joined_late else list(range(job.world))
    if not job.joined_late:
        job.kv.set(f"{key}/{job.rank}", json.dumps(mine))
    keys = [f"{key}/{r}" for r in range(job.world)]
    job.kv.wait([keys[r] for r in others], timeout=job.config.timeout)
    for other in others:
        theirs = json.loads(job.kv.get(keys[other]))
        if theirs != mine:
            raise ModelMismatch(f"rank {job.rank}: {describe_difference(mine, theirs, other)}")


def describe_difference(mine: list[Any], theirs: list[Any], other: int) -> str:
    for i, (a, b) in enumerate(itertools.zip_longest(mine, theirs)):
        if a != b:
            if a is None or b is None:
                present = a if a is not None else b
                where = "only here" if b is None else f"only on rank {other}"
                return f"parameter {i} {present[0]!r} exists {where}; the models differ"
            return (
                f"parameter {i} differs from rank {other}'s: {a[0]!r} {a[2].removeprefix('torch.')}{a[1]} here, "
                f"{b[0]!r} {b[2].removeprefix('torch.')}{b[1]} there"
            )
    return "models are equal"


class _DistributedMixin:
    """Methods of the returned optimizer; its other methods are the wrapped optimizer's class's."""

    _nanodist: Synchronizer | None
    _nanodist_synchronized: bool
    _nanodist_skip: bool
    param_groups: list[dict[str, Any]]

    def in_flight(self) -> bool:
        """Whether gradients of this step are being exchanged (nd.synchronize() waits only for those)."""
        return self._nanodist is not None and not self._nanodist_synchronized and self._nanodist.grads.in_flight

    def synchronize(self) -> None:
        """Wait for the gradients in flight and put their averages into .grad (once per step)."""
        if self._nanodist is not None and not self._nanodist_synchronized:
            self._nanodist.synchronize()
            self._nanodist_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Horovod's pattern for work between averaging and the update, such as gradient clipping:
        `optimizer.synchronize()`, clip, then `with optimizer.skip_synchronize(): optimizer.step()`."""
        self._nanodist_skip = True
        try:
            yield
        finally:
            self._nanodist_skip = False

    def made(self) -> int:
        """Its place in the order DistributedOptimizers were made (the same on every rank); -1 alone."""
        return -1 if self._nanodist is None else self._nanodist.index

    def steps_taken(self) -> int:
        return 0 if self._nanodist is None else self._nanodist.grads.step

    def step_joined(self) -> int:
        """nd.join: one step of the others with zeros from this rank; returns how many ranks contributed.
        The averaged gradient updates this rank's model too, so it stays the same as the others'."""
        assert self._nanodist is not None
        if self._nanodist.server_side:
            raise RuntimeError(
                "nd.join() needs gradients averaged in the group; with server_optimizer= it is not supported"
            )
        self._nanodist.set_joined(True)
        try:
            self.synchronize()
        finally:
            self._nanodist.set_joined(False)
            self._nanodist_synchronized = False
        super().step()  # type: ignore[misc]  # the wrapped optimizer's class follows in the MRO
        return self._nanodist.grads.contributors

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._nanodist is not None:
            if self._nanodist_skip and not self._nanodist_synchronized and self._nanodist.grads.in_flight:
                raise RuntimeError(
                    "step() inside skip_synchronize() before synchronize(): the gradients are not averaged yet; "
                    "call optimizer.synchronize() first"
                )
            self._nanodist.check_trainable(self.param_groups)
        self.synchronize()
        self._nanodist_synchronized = False
        if self._nanodist is not None and self._nanodist.server_side:
            return loss  # the servers applied the update and synchronize() brought it back
        super().step()  # type: ignore[misc]  # the wrapped optimizer's class follows in the MRO
        return loss


def DistributedOptimizer(  # noqa: N802 - Horovod's name, so that switching is a one-line change
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    *,
    compression: Compression | str | None = None,
    backward_passes_per_step: int = 1,
    bucket_cap_mb: float = DEFAULT_BUCKET_BYTES / 2**20,
    server_optimizer: ps.Optimizer | None = None,
    mode: str | None = None,
    named_buffers: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> torch.optim.Optimizer:
    """Wrap `optimizer` so that each step uses the gradient averaged over every worker.

    named_parameters: the model's named_parameters(); every trainable parameter the optimizer updates must be
        named. Frozen ones (requires_grad=False) are skipped, as plain torch skips them.
    compression: "fp16" or "bf16" halve the gradient bytes on the wire (Compression.none by default).
    backward_passes_per_step: accumulate this many backward passes before averaging. The step uses their
        mean, so do not divide the loss by it (Horovod sums them unless average_aggregated_gradients=True).
    bucket_cap_mb: gradients travel in buckets of about this size (DDP's default, 25 MB).
    server_optimizer: one of nanodist.client's factories (sgd, momentum, adam, adagrad): the servers apply
        it and workers pull parameters; the wrapped optimizer is then not used. ASP and SSP need it.
    mode: "bsp", "asp" or "ssp", as the servers were started (default NANODIST_MODE, else bsp).
    named_buffers: the model's named_buffers(); their floating-point ones (BatchNorm statistics) are
        averaged over every worker at each step, so that all ranks hold the same.
    """
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    job = runtime.job()
    mode = mode or (job.config.mode if job is not None else "bsp")
    if mode not in ("bsp", "asp", "ssp"):
        raise ValueError(f"mode {mode!r} is unknown; choose bsp, asp or ssp")
    if mode != "bsp" and server_optimizer is None:
        raise ValueError(f"mode {mode!r} needs server_optimizer= (in ASP and SSP the servers apply the updates)")
    if job is not None and job.config.elastic and (server_optimizer is not None or job.config.flat):
        raise ValueError(
            "server_optimizer= and --flat are not supported in an elastic job: the servers count the steps of "
            "each worker, and a new generation does not carry that count over; average gradients in the group "
            "(the default) instead"
        )
    codec = Compression.parse(compression)
    if server_optimizer is not None and codec is not Compression.none:
        raise ValueError("compression applies to averaged gradients; with server_optimizer= leave it unset")
    named = _named(optimizer, named_parameters)
    cls = type(type(optimizer).__name__, (_DistributedMixin, type(optimizer)), {})
    wrapped: Any = object.__new__(cls)
    wrapped.__dict__ = optimizer.__dict__  # one state: the wrapped optimizer and this object stay in step
    # An elastic job of one may grow, so it keeps its synchronizer.
    needed = job is not None and (job.world > 1 or server_optimizer is not None or job.config.elastic)
    wrapped._nanodist = (
        Synchronizer(
            job,
            named,
            list(named_buffers or []),
            compression=codec,
            backward_passes_per_step=backward_passes_per_step,
            bucket_bytes=int(bucket_cap_mb * 2**20),
            server_optimizer=server_optimizer,
            mode=mode,
        )
        if job is not None and needed
        else None
    )
    wrapped._nanodist_synchronized = False
    wrapped._nanodist_skip = False
    if wrapped._nanodist is not None:
        runtime.register(wrapped)
    return cast(torch.optim.Optimizer, wrapped)  # a subclass of the optimizer's class, made at run time


def _named(
    optimizer: torch.optim.Optimizer, named_parameters: Iterable[tuple[str, torch.Tensor]] | None
) -> list[tuple[str, torch.Tensor]]:
    """The optimizer's parameters with names, in the model's order."""
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        return [(f"param.{i}", p) for i, p in enumerate(in_optimizer) if p.requires_grad]
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    known = {id(p) for _, p in named}
    # A frozen parameter gets no gradient, so the optimizer skips it as plain torch does.
    missing = [i for i, p in enumerate(in_optimizer) if id(p) not in known and p.requires_grad]
    if missing:
        raise ValueError(
            f"named_parameters lacks {len(missing)} of the optimizer's parameters (first: index {missing[0]})"
        )
    wanted = {id(p) for p in in_optimizer}
    return [(n, p) for n, p in named if id(p) in wanted]
