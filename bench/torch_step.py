"""Data-parallel step time of nanodist.torch against torch DDP over gloo, side by side.

The same model, the same 4 workers on this machine and the same per-worker
batch (16), in the same run: nanodist under `nanodist run` in two layouts
(one MPI group of 4, which needs no parameter server; an MPI group and a TCP
group of 2, averaged across groups through 2 parameter-server shards, BSP),
and torch DistributedDataParallel with 4 gloo processes. nanodist runs each
layout twice: with its optimizer wrapper (nd.DistributedOptimizer) and with
its DDP wrapper (nd.DistributedDataParallel and the plain optimizer). Communication per step
is the step minus the same step on a plain copy of the model (no
communication), measured in the same processes. Ratios are nanodist / DDP.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import ddp_ranks, nanodist_run, table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = os.path.join(HERE, "torch_step_ranks.py")
MODELS = {"cnn": "digits CNN (example a, 30K parameters)", "mlp": "16M-parameter MLP (64-4000-4000-10)"}


WRAPPERS = {"optimizer": "nanodist", "ddp": "nanodist-ddp"}  # the row's name: torch_step_ranks.py's system


def nanodist(model: str, compression: str, steps: int, groups: str, system: str) -> dict[str, float]:
    return nanodist_run(["--groups", groups, "--timeout", "300", RANKS, system, model, compression, str(steps)])


def ddp(model: str, compression: str, steps: int) -> dict[str, float]:
    return ddp_ranks(RANKS, ["ddp", model, compression, str(steps)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layouts", default="mpi:4 mpi:2,tcp:2", help="nanodist --groups values, space-separated")
    parser.add_argument("--models", default="cnn,mlp")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        for compression in ("none", "fp16"):
            theirs = ddp(model, compression, args.steps)
            for layout in args.layouts.split():
                for wrapper, system in WRAPPERS.items():
                    rows.append(
                        row(
                            model,
                            compression,
                            layout,
                            wrapper,
                            nanodist(model, compression, args.steps, layout, system),
                            theirs,
                        )
                    )
    print(
        "nanodist.torch (BSP; 2 shards when groups > 1) vs torch DDP (gloo, 4 processes), ms per step, batch 16/worker"
    )
    print(
        table(
            [
                "model",
                "nanodist groups",
                "wire",
                "nanodist wrapper",
                "nanodist step",
                "DDP step",
                "step ratio",
                "nanodist comm",
                "DDP comm",
                "comm ratio",
            ],
            rows,
        )
    )
    by_wrapper = {(r[0], r[1], r[2], r[3]): float(r[4]) for r in rows}
    for model_name, layout, wire, wrapper in by_wrapper:
        if wrapper == "ddp":
            ratio = by_wrapper[(model_name, layout, wire, "ddp")] / by_wrapper[(model_name, layout, wire, "optimizer")]
            print(f"DDP wrapper / optimizer wrapper, {model_name}, {layout}, {wire}: {ratio:.2f}")


def row(
    model: str, compression: str, layout: str, wrapper: str, ours: dict[str, float], theirs: dict[str, float]
) -> list[str]:
    ours_comm = max(0.0, ours["step_ms"] - ours["local_ms"])
    theirs_comm = max(0.0, theirs["step_ms"] - theirs["local_ms"])
    print(f"  {model} {compression} {layout} {wrapper}: nanodist {ours}, DDP {theirs}", file=sys.stderr, flush=True)
    return [
        MODELS[model],
        layout,
        compression,
        wrapper,
        f"{ours['step_ms']:.1f}",
        f"{theirs['step_ms']:.1f}",
        f"{ours['step_ms'] / theirs['step_ms']:.2f}",
        f"{ours_comm:.1f}",
        f"{theirs_comm:.1f}",
        f"{ours_comm / theirs_comm:.2f}" if theirs_comm > 0 else "n/a",
    ]


if __name__ == "__main__":
    main()
