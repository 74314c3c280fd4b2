"""`nanodist up`: the whole cluster as local processes, trained to completion.

It starts the parameter-server shards, the barrier and lock services, waits
for their health checks, then starts the worker groups (mpiexec for an MPI
group, one process per rank for a TCP group). Every child's output is
streamed with a prefix. If any child fails, or on Ctrl-C, every child's
process group is stopped and the exit status is non-zero, naming the culprit.
An elastic group (--elastic) goes on without a worker that fails, or starts
it again (--max-restarts); only a failed server, or every worker failing,
stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from nanodist.workers.cluster import Cluster, LaunchError, nanodist_argv
from nanodist.workers.config import ConfigError, JobConfig, TrainConfig
from nanodist.workers.settings import SettingError, add_flags, build, declared, from_file, setting, to_argv


@dataclass(kw_only=True)
class LaunchConfig:
    """What only the launcher decides. Every worker setting is TrainConfig's and passes through."""

    shards: int = setting(2, flag="--shards", help="parameter-server shards", env=False)
    groups: str = setting(
        "mpi:2,tcp:2", flag="--groups", help="worker groups as backend:size, comma-separated", env=False
    )
    startup_timeout: float = setting(
        30.0, flag="--startup-timeout", help="seconds for the services to turn healthy", env=False
    )
    store: str = setting(
        "embedded",
        flag="--store",
        help="the lock and barrier services' store: embedded, or etcd://HOST:PORT,... of a running etcd",
        env=False,
    )
    replicas: int = setting(1, flag="--replicas", help="replicas of the lock and barrier services", env=False)
    ps_replicas: int = setting(
        1,
        flag="--ps-replicas",
        help="replicas of each shard: a primary and backups that take over when it dies (docs/durability.md)",
        env=False,
    )
    max_restarts: int = setting(
        0,
        flag="--max-restarts",
        help="with --elastic: start a worker that fails again, at most this many times in all; it rejoins",
        env=False,
    )


# The worker settings the launcher fills in itself, from the cluster it starts and from --groups.
PLACED = ("ps", "barrier", "lock", "backend", "group_id", "num_groups", "group_size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file with any of the settings below, by flag name (flags win)")
    # No NANODIST_* defaults here: the launcher passes every setting on, so the workers all agree.
    add_flags(parser, LaunchConfig, environment=False, defaults=False)
    add_flags(parser, TrainConfig, exclude=PLACED, environment=False, defaults=False)


def settings(args: argparse.Namespace) -> tuple[LaunchConfig, TrainConfig]:
    """Defaults, overridden by the TOML file, overridden by flags given on the command line.

    The TrainConfig is every group's; worker_config() places it in the cluster.
    """
    values = _read_config(args.config) if args.config else {}
    values.update(vars(args))
    run_id = values.get("run_id") or time.strftime("run-%Y%m%d-%H%M%S")
    return build(LaunchConfig, values), build(TrainConfig, values, run_id=run_id)


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as error:
        raise LaunchError(f"{path}: {error}") from None
    launch = {d.setting.dest for d in declared(LaunchConfig)}
    train = {d.setting.dest for d in declared(TrainConfig) if d.name not in PLACED}
    unknown = sorted(set(table) - launch - train)
    if unknown:
        raise LaunchError(f"{path}: unknown settings {unknown}; known: {sorted(launch | train)}")
    try:
        return {
            **from_file(LaunchConfig, {k: v for k, v in table.items() if k in launch}, path),
            **from_file(TrainConfig, {k: v for k, v in table.items() if k in train}, path),
        }
    except SettingError as error:
        raise LaunchError(str(error)) from None


J = TypeVar("J", bound=JobConfig)
T = TypeVar("T")


def worker_config(train: J, groups: list[tuple[str, int]], group_id: int, ps: list[str], barrier: str, lock: str) -> J:
    """The settings of group `group_id`'s workers: `train`, placed in the cluster. An elastic TCP group
    counts its members as they come (--group-size 0), as its size changes with the generations; an
    MPI group keeps its size (it leaves the job whole, and comes back whole when restarted)."""
    backend, size = groups[group_id]
    return replace(
        train,
        ps=tuple(ps),
        barrier=barrier,
        lock=lock,
        backend=backend,
        group_id=group_id,
        num_groups=len(groups),
        group_size=0 if train.elastic and backend == "tcp" else size,
    )


def worker_argv(config: TrainConfig) -> list[str]:
    return nanodist_argv("worker", *to_argv(config))


def parse_groups(spec: str) -> list[tuple[str, int]]:
    groups = []
    for item in spec.split(","):
        backend, _, size = item.strip().partition(":")
        if backend not in ("mpi", "tcp") or not size.isdigit() or int(size) < 1:
            raise LaunchError(f"--groups: {item!r} should be mpi:N or tcp:N")
        groups.append((backend, int(size)))
    if len({size for _, size in groups}) != 1:
        raise LaunchError(f"--groups: all groups need the same size, got {spec!r}")
    return groups


def check_before_start(config: JobConfig, launch: LaunchConfig) -> None:
    """Refuse settings that cannot work before any process starts."""
    try:
        config.validate()
    except ConfigError as error:
        raise LaunchError(str(error)) from None
    if launch.max_restarts and not config.elastic:
        raise LaunchError("--max-restarts needs --elastic: a group of fixed size cannot take a worker back")
    if launch.ps_replicas < 1:
        raise LaunchError(f"--ps-replicas must be >= 1, got {launch.ps_replicas}")
    if launch.replicas < 1 or (launch.replicas > 1 and launch.store == "embedded"):
        raise LaunchError(f"--replicas {launch.replicas}: more than 1 needs --store etcd://... (the replicas share it)")


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel's), else the one on PATH."""
    found = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if found is None:
        raise LaunchError("an mpi group needs mpiexec (pip install mpich)")
    return found


def start_services(
    cluster: Cluster, launch: LaunchConfig, job: JobConfig, groups: list[tuple[str, int]]
) -> tuple[list[str], str, str]:
    """Start the shards, the barrier and the lock service, each on a port of its own; return their
    addresses once every one is healthy. The shards' BSP step counts one push per group, or per worker
    in flat mode."""
    pushers = sum(size for _, size in groups) if job.flat else len(groups)
    ps = ["--mode", job.mode, "--num-workers", str(pushers), "--staleness", str(job.staleness)]

    def replicas(role: str) -> str:  # "HOST:PORT,HOST:PORT": the workers' clients move between them
        names = [role] if launch.replicas == 1 else [f"{role}-{i}" for i in range(launch.replicas)]
        args, several = ["--store", launch.store], launch.replicas > 1
        return ",".join(cluster.serve(n, role, args, launch.startup_timeout, replica=several) for n in names)

    barrier, lock = replicas("barrier"), replicas("lock")

    def shard(i: int) -> str:  # a replica set: "A+B", its primary elected on the lock service
        if launch.ps_replicas == 1:
            return cluster.serve(f"ps-{i}", "ps", ps, launch.startup_timeout)
        replicated = [*ps, "--replica-set", f"shard-{i}", "--coordinator", lock]
        return "+".join(
            cluster.serve(f"ps-{i}-{r}", "ps", replicated, launch.startup_timeout, replica=True)
            for r in range(launch.ps_replicas)
        )

    return [shard(i) for i in range(launch.shards)], barrier, lock


def launch(cluster: Cluster, launch: LaunchConfig, train: TrainConfig) -> dict[str, Any]:
    groups = parse_groups(launch.groups)
    stages = train.pipeline_stages
    if stages > 1 and groups[0][1] != stages:
        raise LaunchError(f"--pipeline-stages {stages}: every group is one pipeline replica, so needs {stages} ranks")
    check_before_start(worker_config(train, groups, 0, ["127.0.0.1:0"], "", ""), launch)
    shards, barrier, lock = start_services(cluster, launch, train, groups)
    configs = [worker_config(train, groups, gid, shards, barrier, lock) for gid in range(len(groups))]
    for config in configs:
        gid, argv = config.group_id, worker_argv(config)
        size = groups[gid][1]  # an elastic group counts its members: its group_size is 0
        if config.backend == "mpi":
            cluster.spawn(f"group{gid}-mpi", [find_mpiexec(), "-n", str(size), *argv])
        else:
            for r in range(size):
                cluster.spawn(f"group{gid}-tcp-{r}", argv)
    watch(cluster, launch, train.elastic)
    with open(os.path.join(train.runs_dir, train.run_id, "metrics.json")) as f:
        return json.load(f)


def watch(cluster: Cluster, launch: LaunchConfig, elastic: bool) -> None:
    """Wait for the workers: an elastic group goes on without (or restarts) a worker that fails."""
    if elastic:
        cluster.watch_elastic_workers(launch.max_restarts)
    else:
        cluster.watch_workers()


def supervise(command: str, cluster: Cluster, body: Callable[[], T]) -> T:
    """Run `body` (which starts children in `cluster`), then stop every child whatever happens.
    SIGTERM is treated as Ctrl-C; a failure is one line on stderr and a non-zero exit."""

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        result = body()
    except KeyboardInterrupt:
        cluster.stop()
        print(f"{command}: interrupted; every process stopped", file=sys.stderr)
        raise SystemExit(130) from None
    except (LaunchError, OSError) as error:
        cluster.stop()
        print(f"{command}: failed: {error}; every process stopped", file=sys.stderr)
        raise SystemExit(1) from None
    except BaseException:
        cluster.stop()
        raise
    cluster.stop()
    return result


def run(args: argparse.Namespace) -> None:
    cluster = Cluster()
    began = time.monotonic()
    launch_config, train = supervise("nanodist up", cluster, lambda: settings(args))
    print(
        f"nanodist up: run {train.run_id}, groups {launch_config.groups}, {launch_config.shards} shards, {train.mode}",
        flush=True,
    )
    metrics = supervise("nanodist up", cluster, lambda: launch(cluster, launch_config, train))
    run_dir = os.path.join(train.runs_dir, train.run_id)
    print(f"\nnanodist up: run {train.run_id} finished in {time.monotonic() - began:.1f} s", flush=True)
    layout = "flat" if train.flat else "hierarchical"
    if train.pipeline_stages > 1:
        layout = f"{train.pipeline_stages}-stage pipeline x {len(parse_groups(launch_config.groups))} replicas"
    print(
        f"  test accuracy {metrics['final_test_accuracy']:.4f} after {len(metrics['epochs'])} epochs "
        f"({metrics['world_size']} workers, {train.mode.upper()}, {layout})"
    )
    print(f"  metrics: {os.path.join(run_dir, 'metrics.json')}")
    print(f"  plot:    {os.path.join(run_dir, 'training.png')}", flush=True)
