"""A rank that ends its script while others still step: it says so, and they stop naming it.

Uneven data is the usual cause: one rank's loader runs out first. Without
nd.join() that rank leaves, and the others would wait for its gradients for
ever: it is alive until it exits, so no lease lapses, and an MPI group has no
timeout at all. So a rank that shuts down records how many steps it took, and
a rank waiting for a step the leaver never began raises, within a second, an
error that names it; uncaught, it stops the job as any failure does (the
job's barrier broken, an MPI group aborted).
"""

from __future__ import annotations

from nanodist.client import NotFound
from nanodist.workers.job import Job


class RankLeft(RuntimeError):
    """A rank ended its script while this one still steps."""


def _key(job: Job) -> str:
    return f"{job.config.run_id}/torch/left"


def announce(job: Job, steps: int) -> None:
    """This rank leaves the job after `steps` steps."""
    job.kv.set(f"{_key(job)}/{job.rank}", str(steps))
    job.kv.add(f"{_key(job)}/count", 1)


def problem(job: Job, step: int) -> str | None:
    """Why step `step` (counted from 0) cannot complete: a rank left before it, or None."""
    try:
        left = int(job.kv.get(f"{_key(job)}/count"))  # a read: a wait polls it every half second
    except NotFound:
        return None
    for rank in range(job.world):
        try:
            steps = int(job.kv.get(f"{_key(job)}/{rank}"))
        except NotFound:
            continue
        if rank != job.rank and steps <= step:
            return (
                f"rank {rank} left after step {steps} while {job.world - left} ranks are at step {step + 1}; "
                "a rank that runs out of data first must call nd.join() (see docs/torch.md, Uneven data)"
            )
    return None
