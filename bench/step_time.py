"""Per-step time of data-parallel training: nanodist (2 groups x 2, hierarchical, BSP) vs torch DDP.

nanodist runs through `nanodist up` with the same MLP and per-worker batch,
and reports its phases from metrics.json. The anchor is torch
DistributedDataParallel over gloo with 4 processes, whose communication time
per step is measured as (step with allreduce) - (step under no_sync). The
last column is nanodist's communication time per step / DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import free_port, table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"digits MLP (64-64-10)": "64", "16M-parameter MLP (64-4000-4000-10)": "4000,4000"}


def nanodist_step(hidden: str, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as runs:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nanodist.workers.cli",
                "up",
                "--run-id",
                "step-time",
                "--runs-dir",
                runs,
                "--hidden",
                hidden,
                "--epochs",
                "1",
                "--max-steps",
                str(steps),
                "--timeout",
                "300",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with open(os.path.join(runs, "step-time", "metrics.json")) as f:
            return json.load(f)["timings"]["mean_ms_per_step"]


def ddp_step(hidden: str, steps: int) -> dict[str, float] | str:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "skipped: torch not installed (make bench-setup)"
    sizes = f"64,{hidden},10"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "ddp_ranks.py"), str(r), "4", port, str(steps), sizes],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(4)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode for p in procs):
        return "failed: " + outputs[0][1][-300:]
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for name, hidden in MODELS.items():
        phases = nanodist_step(hidden, args.steps)
        comm = phases["step"] - phases["compute"]  # everything but compute, as for DDP below
        ddp = ddp_step(hidden, args.steps)
        if isinstance(ddp, str):
            ddp_comm, ratio, ddp_cells = None, ddp, ["", ""]
        else:
            ddp_comm = max(0.0, ddp["step_ms"] - ddp["local_ms"])
            ratio = f"{comm / ddp_comm:.2f}" if ddp_comm else "-"
            ddp_cells = [ddp["step_ms"], ddp_comm]
        rows.append(
            [
                name,
                phases["compute"],
                phases["allreduce"],
                phases["push"],
                phases["pull"],
                phases["broadcast"],
                comm,
                *ddp_cells,
                ratio,
            ]
        )
        print(f"  {name} done", file=sys.stderr)
    print("data-parallel step time, ms per step (4 workers; nanodist = 2 groups x 2, hierarchical, BSP)")
    print(
        table(
            [
                "model",
                "compute",
                "allreduce",
                "push",
                "pull",
                "broadcast",
                "nanodist comm",
                "DDP step",
                "DDP comm",
                "comm ratio",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
