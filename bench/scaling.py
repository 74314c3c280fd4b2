"""How the gradient exchange scales with workers, shards and model size, by simulation, against torch DDP.

The step's compute is a sleep (--sleep, 50 ms), so the CPU spends itself only on communication; then every
parameter gets a constant gradient and the step synchronises (bench/scaling_ranks.py). Overhead is the
median step after a warmup minus the sleep, on rank 0. Layouts, each under `nanodist run` with BSP:

- hierarchical: W/2 TCP groups of 2; each group averages inside itself and its leader pushes to the shards
  (at 2 workers that is one group, which needs no servers, so the shard count changes nothing);
- flat: the same groups with --flat, so every worker pushes to the shards;
- DDP: W torch.distributed processes over gloo, all_reduce on 25 MB buckets as DDP's reducer does.

The ratio is the layout's overhead over DDP's at the same workers and model size. All processes share
this machine, so more workers means less CPU each: this measures contention as much as the network code.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(__file__))
from common import ddp_ranks, nanodist_run, table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = os.path.join(HERE, "scaling_ranks.py")
LAYOUTS = ("hierarchical", "flat")


@dataclass(frozen=True)
class Config:
    layout: str  # hierarchical, flat or ddp
    workers: int
    shards: int  # 0 for DDP, which has none
    model_mb: float

    def __str__(self) -> str:
        shards = "" if self.layout == "ddp" else f" {self.shards} shards"
        return f"{self.layout} {self.workers} workers{shards} {self.model_mb:g} MB"


@dataclass(frozen=True)
class Run:
    steps: int
    warmup: int
    sleep: float
    runs_dir: str  # nanodist run's output folders go here, not into the working tree


def measure(config: Config, run: Run) -> dict[str, float]:
    """Rank 0's result of one configuration: step_ms, overhead_ms, rss_mb."""
    script = [RANKS, str(config.model_mb), str(run.steps), str(run.warmup), str(run.sleep)]
    if config.layout == "ddp":
        return ddp_ranks(script[0], ["ddp", *script[1:]], world=config.workers)
    groups = ",".join(["tcp:2"] * (config.workers // 2))
    flat = ["--flat"] if config.layout == "flat" else []
    launch = ["--groups", groups, "--shards", str(config.shards), "--timeout", "600", "--runs-dir", run.runs_dir]
    return nanodist_run([*launch, *flat, script[0], "nanodist", *script[1:]])


def configs(workers: int, shards: list[int], mb: float) -> list[Config]:
    """DDP first, then each shard count's nanodist layouts, all at one (workers, model size)."""
    return [Config("ddp", workers, 0, mb)] + [Config(x, workers, s, mb) for s in shards for x in LAYOUTS]


def sweep(workers: list[int], shards: list[int], models: list[float], run: Run) -> dict[Config, dict[str, float]]:
    """Every configuration once, DDP first at each (model, workers); a failure is reported and skipped."""
    results: dict[Config, dict[str, float]] = {}
    for mb in models:
        for w in workers:
            for config in configs(w, shards, mb):
                print(f"measuring {config} ...", file=sys.stderr, flush=True)
                began = time.monotonic()
                try:
                    results[config] = measure(config, run)
                except Exception as error:  # one configuration's failure must not end the sweep
                    why = [line for line in str(error).splitlines() if line.strip()][-5:]
                    print(f"  FAILED {config}: " + "\n    ".join(why), file=sys.stderr, flush=True)
                    continue
                r = results[config]
                print(
                    f"  {r['overhead_ms']:.1f} ms overhead, rank 0 peak {r['rss_mb']:.0f} MB,"
                    f" {time.monotonic() - began:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return results


def rows(
    results: dict[Config, dict[str, float]], workers: list[int], shards: list[int], models: list[float]
) -> list[list[object]]:
    out: list[list[object]] = []
    for mb in models:
        for w in workers:
            ddp = results.get(Config("ddp", w, 0, mb))
            for config in configs(w, shards, mb):
                r = results.get(config)
                ratio = (
                    f"{r['overhead_ms'] / ddp['overhead_ms']:.2f}" if r and ddp and ddp["overhead_ms"] > 0 else "n/a"
                )
                overhead = f"{r['overhead_ms']:.1f}" if r else "failed"
                out.append([config.layout, w, config.shards or "-", f"{mb:g}", overhead, ratio])
    return out


def plot(
    results: dict[Config, dict[str, float]], workers: list[int], shards: int, mb: float, sleep: float, path: str
) -> None:
    """Overhead against workers, one line per layout, for one model size and shard count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layout in (*LAYOUTS, "ddp"):
        points = [
            (w, r["overhead_ms"])
            for w in workers
            if (r := results.get(Config(layout, w, 0 if layout == "ddp" else shards, mb))) is not None
        ]
        if points:
            ax.plot(
                *zip(*points, strict=True), marker="o", label="DDP (gloo)" if layout == "ddp" else f"nanodist {layout}"
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_xlabel("workers (all on this machine)")
    ax.set_ylabel("step overhead (ms)")
    ax.set_title(f"{mb:g} MB model, {shards} shards, {sleep * 1e3:g} ms simulated compute")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=ints, default=[2, 4, 8, 16, 32])
    parser.add_argument("--shards", type=ints, default=[1, 2, 4])
    parser.add_argument("--model-mb", type=floats, default=[4.0, 16.0, 64.0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--sleep", type=float, default=0.05, help="the simulated compute per step, in seconds")
    parser.add_argument("--plot-mb", type=float, default=16.0, help="the model size the plot shows")
    parser.add_argument("--plot-shards", type=int, default=2, help="the shard count the plot shows")
    parser.add_argument("--plot", default=os.path.join(HERE, "figures", "scaling.png"))
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 and 4 workers, 1 and 2 shards, 4 MB")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.shards, args.model_mb, args.steps, args.warmup = [2, 4], [1, 2], [4.0], 5, 2
    if any(w < 2 or w % 2 for w in args.workers):
        parser.error(f"--workers: each must be even and at least 2 (groups of 2), got {args.workers}")
    plot_mb = args.plot_mb if args.plot_mb in args.model_mb else args.model_mb[0]
    plot_shards = args.plot_shards if args.plot_shards in args.shards else args.shards[0]
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nanodist-scaling-") as runs_dir:
        run = Run(args.steps, args.warmup, args.sleep, runs_dir)
        results = sweep(args.workers, args.shards, args.model_mb, run)
    print(
        f"gradient exchange per step, {args.sleep * 1e3:g} ms simulated compute, median of {args.steps} steps"
        f" after {args.warmup}; nanodist BSP over TCP groups of 2, DDP over gloo; ratio = overhead / DDP's"
    )
    print(
        table(
            ["layout", "workers", "shards", "model MB", "overhead ms", "vs DDP"],
            rows(results, args.workers, args.shards, args.model_mb),
        )
    )
    if 2 in args.workers:
        print("hierarchical at 2 workers is one group, which needs no servers: its shard count changes nothing")
    plot(results, args.workers, plot_shards, plot_mb, args.sleep, args.plot)
    print(
        f"plot ({plot_mb:g} MB, {plot_shards} shards): {args.plot}; sweep took {time.monotonic() - began:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
