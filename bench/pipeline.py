"""Pipeline bubble: measured idle fraction of each stage against the theory, (K-1)/(M+K-1).

K stages (one process each, BLAS single-threaded so that stages do not share
cores) train an MLP of BENCH_LAYERS x BENCH_WIDTH on batches of BENCH_BATCH,
with M = 1, 4 and 8 micro-batches, under 1F1B and GPipe, over MPI or TCP. A
stage's bubble is the share of its step time not spent computing: waiting for
neighbours and moving activations. The anchor, in the same run, is the same
forward and backward pass in one process with no pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, table  # noqa: E402

from nanodist.workers.models import MLP  # noqa: E402

RANKS = os.path.join(os.path.dirname(__file__), "pipeline_ranks.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_stages(backend: str, stages: int, micro: int, schedule: str) -> list[dict]:
    if backend == "mpi":
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
        out = subprocess.run(
            [mpiexec, "-n", str(stages), sys.executable, RANKS, "mpi", str(micro), schedule],
            env=ENV,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        lines = out.splitlines()
    else:
        peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(stages))
        procs = [
            subprocess.Popen(
                [sys.executable, RANKS, "tcp", str(micro), schedule, str(r), peers],
                env=ENV,
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in range(stages)
        ]
        lines = [p.communicate()[0].strip() for p in procs]
    return sorted((json.loads(line) for line in lines if line.startswith("{")), key=lambda r: r["stage"])


def single_process_ms() -> float:
    """The anchor: one process, whole batch, no pipeline (BLAS single-threaded, as each stage)."""
    code = (
        "import time,numpy as np,os,sys;sys.path.insert(0,'.');from nanodist.workers.models import MLP;"
        "w,l,b=int(os.environ.get('BENCH_WIDTH','1024')),int(os.environ.get('BENCH_LAYERS','6')),"
        "int(os.environ.get('BENCH_BATCH','256'));m=MLP((w,)*l+(10,));p=m.init(0);"
        "r=np.random.default_rng(0);x=r.standard_normal((b,w)).astype(np.float32);y=r.integers(0,10,b);"
        "m.loss_and_grads(p,x,y);t=time.perf_counter();[m.loss_and_grads(p,x,y) for _ in range(8)];"
        "print((time.perf_counter()-t)/8*1000)"
    )
    return float(subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"])
    parser.add_argument("--backend", choices=["mpi", "tcp"], default="mpi")
    args = parser.parse_args()
    k = args.stages
    model = MLP((int(os.environ.get("BENCH_WIDTH", "1024")),) * int(os.environ.get("BENCH_LAYERS", "6")) + (10,))
    anchor = single_process_ms()
    rows = []
    for schedule in args.schedules:
        for micro in args.micro:
            began = time.perf_counter()
            stages = run_stages(args.backend, k, micro, schedule)
            step = max(s["step_ms"] for s in stages)
            rows.append(
                [
                    schedule,
                    micro,
                    (k - 1) / (micro + k - 1),
                    float(np.mean([s["bubble"] for s in stages])),
                    " / ".join(f"{s['compute_ms']:.0f}" for s in stages),
                    " / ".join(f"{s['comm_ms']:.0f}" for s in stages),
                    " / ".join(str(s["peak_micro_batches_held"]) for s in stages),
                    step,
                    step / anchor,
                ]
            )
            print(f"  {schedule} M={micro}: {time.perf_counter() - began:.0f}s", file=sys.stderr)
    print(
        f"{k}-stage pipeline over {args.backend}, MLP {model.sizes}, batch {os.environ.get('BENCH_BATCH', '256')}; "
        f"one process without a pipeline (the anchor): {anchor:.0f} ms per step"
    )
    print(
        table(
            [
                "schedule",
                "M",
                "bubble theory",
                "bubble measured",
                "compute ms/stage",
                "comm+wait ms/stage",
                "peak held",
                "step ms",
                "vs 1 process",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
