"""`nanodist run`: launch a user's training script as the workers of a job, like torchrun or horovodrun.

    nanodist run --groups mpi:2,tcp:2 train.py --epochs 5

starts the parameter-server shards, the barrier and the lock service (as
`nanodist up` does), or uses the cluster given with --ps, --barrier and
--lock; then starts each group's workers running the script, with the job in
their environment (NANODIST_*; nd.init() reads it) on top of the caller's.
Output is forwarded line by line, prefixed with the rank (each worker
prefixes its own lines once nd.init() knows its rank: an MPI group's ranks
share one stream). On Ctrl-C, or when
the first worker fails, everything is stopped and the exit status is
non-zero, naming the rank; with --elastic, the script's nd.elastic.run goes on
without a worker that fails, or an MPI group that lost a rank, and
--max-restarts starts it again (see nanodist.workers.launcher).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass

from nanodist.workers.config import JobConfig
from nanodist.workers.launcher import (
    PLACED,
    Cluster,
    LaunchConfig,
    LaunchError,
    check_before_start,
    find_mpiexec,
    parse_groups,
    start_services,
    supervise,
    watch,
    worker_config,
)
from nanodist.workers.rank_output import PREFIX_VARIABLE
from nanodist.workers.settings import add_flags, build, to_environment

# nd.init() reports an uncaught exception as this line, so that the launcher can name the rank of an MPI group.
FAILED = re.compile(r"(?<=nanodist: )rank \d+ failed: ")


@dataclass(frozen=True)
class Existing:
    """A cluster that is already running."""

    ps: tuple[str, ...]
    barrier: str
    lock: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, LaunchConfig, environment=False, defaults=False)
    add_flags(parser, JobConfig, exclude=PLACED, environment=False, defaults=False)
    parser.add_argument("--ps", help="use these running shards (comma-separated) instead of starting services")
    parser.add_argument("--barrier", help="the running barrier service (with --ps)")
    parser.add_argument("--lock", help="the running lock service (with --ps)")
    parser.add_argument("script", help="the training script; it calls nanodist.torch's init()")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")


def existing_cluster(args: argparse.Namespace) -> Existing | None:
    given = [name for name in ("ps", "barrier", "lock") if getattr(args, name)]
    if not given:
        return None
    if len(given) != 3:
        raise LaunchError("--ps, --barrier and --lock go together: give all three to use a running cluster")
    return Existing(tuple(a for a in args.ps.split(",") if a), args.barrier, args.lock)


def launch(cluster: Cluster, args: argparse.Namespace) -> None:
    values = {k: v for k, v in vars(args).items() if v is not None}
    launch_config = build(LaunchConfig, values)
    job = build(JobConfig, values, run_id=values.get("run_id") or time.strftime("run-%Y%m%d-%H%M%S"))
    groups = parse_groups(launch_config.groups)
    check_before_start(worker_config(job, groups, 0, ["127.0.0.1:0"], "", ""), launch_config)
    if not os.path.exists(args.script):
        raise LaunchError(f"{args.script}: no such file")
    existing = existing_cluster(args)
    if existing is None:
        shards, barrier, lock = start_services(cluster, launch_config, job, groups)
    else:
        shards, barrier, lock = list(existing.ps), existing.barrier, existing.lock
    print(f"nanodist run: job {job.run_id}, groups {launch_config.groups}, {args.script}", flush=True)
    command = [sys.executable, args.script, *args.script_args]
    first = 0
    for group_id, (backend, size) in enumerate(groups):
        env = {**to_environment(worker_config(job, groups, group_id, shards, barrier, lock)), PREFIX_VARIABLE: "1"}
        if backend == "mpi":
            # An elastic job's ranks change with its generations: the group is named by its place.
            ranks = f"ranks {first}-{first + size - 1}" if size > 1 else f"rank {first}"
            name = f"mpi group {group_id}" if job.elastic else ranks
            cluster.spawn(name, [find_mpiexec(), "-n", str(size), *command], env=env)
        elif job.elastic:
            for r in range(size):  # ranks come from the rendezvous, and change with the generations
                cluster.spawn(f"worker {r}", command, env={**env, "NANODIST_LOCAL_RANK": str(r)})
        else:
            for r in range(size):
                # The group rank is given, not taken from the rendezvous counter, so that the prefix is the rank.
                placed = {**env, "NANODIST_LOCAL_RANK": str(r), "NANODIST_RANK": str(r)}
                cluster.spawn(f"rank {first + r}", command, env=placed)
        first += size
    watch(cluster, launch_config, job.elastic)


def run(args: argparse.Namespace) -> None:
    cluster = Cluster(watch_for=FAILED)
    supervise("nanodist run", cluster, lambda: launch(cluster, args))
    print("nanodist run: every worker finished", flush=True)
