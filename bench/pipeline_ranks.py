"""One stage of the pipeline benchmark; every stage prints its timings as one JSON line.

mpiexec -n K python pipeline_ranks.py mpi MICRO SCHEDULE
python pipeline_ranks.py tcp MICRO SCHEDULE RANK PEERS      (one process per stage)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from nanodist.workers.comm import from_env
from nanodist.workers.model_parallel import Pipeline, Schedule
from nanodist.workers.models import MLP
from nanodist.workers.progress import say

WIDTH = int(os.environ.get("BENCH_WIDTH", "1024"))
LAYERS = int(os.environ.get("BENCH_LAYERS", "6"))
BATCH = int(os.environ.get("BENCH_BATCH", "256"))
STEPS = int(os.environ.get("BENCH_STEPS", "8"))


def main() -> None:
    backend, micro, kind = sys.argv[1], int(sys.argv[2]), Schedule(sys.argv[3])
    comm = from_env(backend, rank=int(sys.argv[4]), peers=sys.argv[5]) if backend == "tcp" else from_env(backend)
    model = MLP((WIDTH,) * LAYERS + (10,))
    params = model.init(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    pipeline = Pipeline(comm, model, micro, kind)
    pipeline.step(params, x, y)  # warm up
    pipeline.timings.__init__()  # type: ignore[misc]
    comm.barrier()
    for _ in range(STEPS):
        pipeline.step(params, x, y)
    t = pipeline.timings
    say(  # one write per line, so that mpiexec never splices two stages' lines together
        json.dumps(
            {
                "stage": pipeline.stage,
                "layers": list(pipeline.layers),
                "step_ms": t.wall / t.steps * 1000,
                "compute_ms": t.compute / t.steps * 1000,
                "comm_ms": t.comm / t.steps * 1000,
                "bubble": 1 - t.compute / t.wall,
                "peak_micro_batches_held": pipeline.peak_cached,
            }
        )
    )
    comm.close()


if __name__ == "__main__":
    main()
