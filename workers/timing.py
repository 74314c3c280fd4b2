"""Per-phase wall-clock accounting for training steps."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("step", "compute", "allreduce", "push", "pull", "broadcast", "wait")


class PhaseTimer:
    """Accumulates seconds per phase: `with timer("push"): ...`."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] += time.perf_counter() - begin

    def summary(self) -> dict[str, float]:
        """Total seconds per phase plus milliseconds per step."""
        phases = [*PHASES, *(p for p in self.totals if p not in PHASES)]
        out = {phase: round(self.totals.get(phase, 0.0), 6) for phase in phases}
        out["steps"] = self.steps
        for phase in phases:
            out[f"{phase}_ms_per_step"] = round(1000 * self.totals.get(phase, 0.0) / max(1, self.steps), 4)
        return out
