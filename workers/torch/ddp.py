"""nd.DistributedDataParallel: torch's DDP in shape, over nanodist's groups and parameter servers.

    model = nd.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters())  # the user's own, unwrapped

Gradients are averaged during backward, in the same buckets as
DistributedOptimizer's and overlapping the rest of backward; when backward
returns, every parameter's .grad holds the average, so any optimizer steps on
it. As DDP does, the wrapper starts every rank from rank 0's parameters and
buffers and, with broadcast_buffers (the default), hands rank 0's buffers to
every rank at each step: after each backward rather than before each
forward, so that the buffers travel with the gradients instead of in a round
trip of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

import nanodist.torch.runtime as runtime
from nanodist.torch.broadcast import broadcast_parameters
from nanodist.torch.buckets import DEFAULT_BUCKET_BYTES
from nanodist.torch.compression import Compression
from nanodist.torch.join import run_joined
from nanodist.torch.optimizer import Synchronizer
from nanodist.workers.job import Job


class DistributedDataParallel(torch.nn.Module):
    """Wrap `module` so that backward averages its gradients over every worker.

    broadcast_buffers: every rank gets rank 0's floating-point buffers (BatchNorm statistics) at each step.
    bucket_cap_mb: gradients travel in buckets of about this size (DDP's default, 25 MB).
    compression: "fp16" or "bf16" halve the gradient bytes on the wire.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        broadcast_buffers: bool = True,
        bucket_cap_mb: float = DEFAULT_BUCKET_BYTES / 2**20,
        compression: Compression | str | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        job = runtime.job()
        self._job: Job | None = job if job is not None and job.world > 1 else None
        self._nanodist: Synchronizer | None = None
        self._backward_queued = False
        if self._job is None:
            return
        if self._job.config.elastic:
            raise ValueError(
                "nd.DistributedDataParallel does not follow an elastic job's generations: wrap the optimizer"
            )
        broadcast_parameters(self._job, module.state_dict(), root_rank=0)  # DDP starts every rank from rank 0's
        trainable: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._nanodist = Synchronizer(
            self._job,
            trainable,
            list(module.named_buffers()) if broadcast_buffers else [],
            compression=Compression.parse(compression),
            backward_passes_per_step=1,
            bucket_bytes=int(bucket_cap_mb * 2**20),
            server_optimizer=None,
            mode="bsp",
            buffer_source=0,
        )
        # After the bucket's own hook on each parameter: the first gradient of a backward queues the wait.
        for _, param in trainable:
            param.register_post_accumulate_grad_hook(self._on_first_gradient)
        runtime.register(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _on_first_gradient(self, _param: torch.Tensor) -> None:
        if self._backward_queued or self._nanodist is None or self._nanodist.grads.paused:
            return
        self._backward_queued = True
        # Runs once backward has finished: its buckets are all in flight by then, or are filled now.
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._backward_queued = False
        self.synchronize()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally; the first backward after it averages the sum."""
        if self._nanodist is None:
            yield
            return
        self._nanodist.grads.paused = True
        try:
            yield
        finally:
            self._nanodist.grads.paused = False

    @contextlib.contextmanager
    def join(self) -> Iterator[None]:
        """Uneven data: a rank whose loop inside ends first takes part in the others' backward passes with
        nothing to add, until every rank's loop has ended; then every rank takes the parameters of the
        rank that finished last (as DDP's Join does: the ranks that left early have not stepped since)."""
        yield
        if self._job is not None and self._nanodist is not None:
            last = run_joined(self._job, self.step_joined)
            broadcast_parameters(self._job, self.module.state_dict(), root_rank=last)

    # --- what nanodist.torch's runtime asks of every wrapper (runtime.Synchronizable) ---

    def in_flight(self) -> bool:
        return self._nanodist is not None and self._nanodist.grads.in_flight

    def synchronize(self) -> None:
        if self._nanodist is not None:
            self._nanodist.check_trainable([{"params": [p for p in self.module.parameters()]}])
            self._nanodist.synchronize()

    def step_joined(self) -> int:
        assert self._nanodist is not None
        self._nanodist.set_joined(True)
        try:
            self._nanodist.synchronize()
        finally:
            self._nanodist.set_joined(False)
        return self._nanodist.grads.contributors

    def steps_taken(self) -> int:
        return 0 if self._nanodist is None else self._nanodist.grads.step

    def made(self) -> int:
        return -1 if self._nanodist is None else self._nanodist.index
