"""Embedding tables: nanodist.torch against torch DDP over gloo, side by side.

Four sum-pooled embedding bags of ROWS x 16 and a small MLP, 256 samples per
worker per step, Adagrad, 4 workers on this machine, in the same run. DDP
keeps every table whole on every worker (sparse gradients); nanodist keeps
them on 2 parameter-server shards and moves only the batch's rows, in two
layouts: one TCP group of 4 (rows gathered to the leader, which pushes) and
flat (every worker pushes). Where 4 replicas of the tables do not fit this
machine's memory, DDP is not run and the row says so.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import ddp_ranks, nanodist_run, table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = os.path.join(HERE, "embedding_step_ranks.py")
WORLD = 4
DDP_BYTES_PER_ROW = 16 * 4 * 3  # value, sparse gradient and Adagrad's sum, per replica
MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def nanodist(rows: int, steps: int, layout: list[str]) -> dict:
    return nanodist_run([*layout, "--timeout", "300", RANKS, "nanodist", str(rows), str(steps)])


def ddp(rows: int, steps: int) -> dict | str:
    needed = WORLD * 4 * rows * DDP_BYTES_PER_ROW
    if needed > 0.8 * MEMORY:
        return f"not run: 4 replicas need ~{needed / 2**30:.0f} GiB of {MEMORY / 2**30:.0f}"
    return ddp_ranks(RANKS, ["ddp", str(rows), str(steps)], WORLD)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", default="1000000,10000000", help="rows per table, comma-separated")
    args = parser.parse_args()
    layouts = {"tcp:4": ["--groups", "tcp:4"], "tcp:4 flat": ["--groups", "tcp:4", "--flat"]}
    lines = []
    for rows in (int(r) for r in args.rows.split(",")):
        theirs = ddp(rows, args.steps)
        for name, layout in layouts.items():
            ours = nanodist(rows, args.steps, layout)
            print(f"  {rows} rows, {name}: nanodist {ours}, DDP {theirs}", file=sys.stderr, flush=True)
            if isinstance(theirs, str):
                their_cells = [theirs, "", ""]
                ratio = "n/a"
            else:
                their_cells = [
                    f"{theirs['step_ms']:.1f}",
                    f"{theirs['samples_per_s']:.0f}",
                    max(theirs["peak_rss_mib"]),
                ]
                ratio = f"{ours['step_ms'] / theirs['step_ms']:.2f}"
            lines.append(
                [
                    f"4 x {rows:,} x 16",
                    name,
                    f"{ours['step_ms']:.1f}",
                    f"{ours['samples_per_s']:.0f}",
                    max(ours["peak_rss_mib"]),
                    *their_cells,
                    ratio,
                ]
            )
    print("embedding tables: nanodist.torch (2 shards, BSP) vs torch DDP (gloo), 4 workers, 256 samples/worker/step")
    headers = ["tables", "nanodist layout", "nanodist ms/step", "samples/s", "worker RSS MiB"]
    headers += ["DDP ms/step", "DDP samples/s", "DDP worker RSS MiB", "step ratio"]
    print(table(headers, lines))


if __name__ == "__main__":
    main()
