"""nd.join(): uneven data, in Horovod's shape.

A rank that has run out of data calls nd.join(). Until every rank has joined,
it takes part in the others' steps with zeros, counted as no one: every
bucket carries a slot that says how many ranks contributed (buckets.py), and
the average is scaled to theirs alone. The joined rank applies the same
averaged gradient to its own model, so all ranks stay identical. nd.join()
returns once every rank has joined, with the rank that joined last.

While a rank is joined, the others may only step their DistributedOptimizers
(one step of each per iteration, in the order they were made); collectives of
their own (nd.allreduce, a broadcast) must wait until all have joined.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import nanodist.torch.runtime as runtime
from nanodist.workers.job import Job

_rounds = itertools.count()  # a script may join once per epoch: each time has a key of its own


def join(job: Job) -> int:
    if runtime.exchanges_without_join():
        raise RuntimeError(
            "nd.join() cannot stand in for nd.Embedding tables' row exchanges; give every rank as many batches"
        )
    optimizers = runtime.distributed_optimizers()
    return run_joined(job, lambda: max([optimizer.step_joined() for optimizer in optimizers], default=0))


def run_joined(job: Job, step_joined: Callable[[], int]) -> int:
    """Take part in the others' steps (step_joined: one step with zeros, returning how many ranks
    contributed to it) until no rank contributes; return the rank that joined last."""
    if job.config.elastic:
        raise RuntimeError(
            "nd.join() is for jobs of a fixed size; in an elastic job nd.elastic.ElasticSampler gives every rank "
            "the same number of batches"
        )
    key = f"{job.config.run_id}/torch/join/{next(_rounds)}"
    place = job.kv.add(f"{key}/count", 1)
    job.kv.set(f"{key}/{place}", str(job.rank))
    while step_joined() > 0:
        pass  # someone still has data: their step goes on, with this rank's zeros
    job.kv.wait([f"{key}/{job.world}"], timeout=job.config.timeout)
    return int(job.kv.get(f"{key}/{job.world}"))
