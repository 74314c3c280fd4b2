"""`nanodist up`: the whole cluster as local processes, trained to completion.

It starts the parameter-server shards, the barrier and lock services, waits
for their health checks, then starts the worker groups (mpiexec for an MPI
group, one process per rank for a TCP group). Every child's output is
streamed with a prefix. If any child fails, or on Ctrl-C, every child's
process group is stopped and the exit status is non-zero, naming the culprit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULTS: dict[str, Any] = {
    "run_id": None,
    "runs_dir": "runs",
    "shards": 2,
    "groups": "mpi:2,tcp:2",
    "mode": "bsp",
    "staleness": 0,
    "flat": False,
    "epochs": 10,
    "batch_size": 16,
    "lr": 0.3,
    "hidden": "64",
    "seed": 0,
    "max_steps": 0,
    "startup_timeout": 30.0,
    "timeout": 60.0,
    "pipeline_stages": 0,
    "micro_batches": 4,
    "schedule": "1f1b",
}


class LaunchError(RuntimeError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML file with any of the settings below (flags win)")
    parser.add_argument("--run-id", help="default: run-<date>-<time>")
    parser.add_argument("--runs-dir", help="where runs/<run-id>/ is written (default runs)")
    parser.add_argument("--shards", type=int, help="parameter-server shards (default 2)")
    parser.add_argument("--groups", help="worker groups as backend:size, comma-separated (default mpi:2,tcp:2)")
    parser.add_argument("--mode", choices=["bsp", "asp", "ssp"], help="consistency (default bsp)")
    parser.add_argument("--staleness", type=int, help="SSP bound (default 0)")
    parser.add_argument("--flat", action="store_const", const=True, help="every worker pushes (no group allreduce)")
    parser.add_argument("--epochs", type=int, help="default 10")
    parser.add_argument("--batch-size", type=int, help="per worker (default 16)")
    parser.add_argument("--lr", type=float, help="SGD learning rate on the server (default 0.3)")
    parser.add_argument("--hidden", help="hidden layer sizes (default 64)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (default: all epochs)")
    parser.add_argument("--startup-timeout", type=float, help="seconds for the services to turn healthy")
    parser.add_argument("--timeout", type=float, help="the workers' --timeout")
    parser.add_argument(
        "--pipeline-stages",
        type=int,
        help="run each group as one replica of a pipeline with this many stages (the group size)",
    )
    parser.add_argument("--micro-batches", type=int, help="micro-batches per batch in a pipeline (default 4)")
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], help="pipeline schedule (default 1f1b)")


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, overridden by the TOML file, overridden by flags given on the command line."""
    merged = dict(DEFAULTS)
    if args.config:
        with open(args.config, "rb") as f:
            from_file = tomllib.load(f)
        unknown = set(from_file) - set(DEFAULTS)
        if unknown:
            raise LaunchError(f"{args.config}: unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        merged.update(from_file)
    merged.update({k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None})
    merged["run_id"] = merged["run_id"] or time.strftime("run-%Y%m%d-%H%M%S")
    return merged


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    server: bool


class Cluster:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self.output_lock = threading.Lock()

    def spawn(self, name: str, argv: list[str], server: bool = False) -> Child:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )  # its own process group, so stop() reaches mpiexec's ranks
        child = Child(name, process, server)
        self.children.append(child)
        threading.Thread(target=self._stream, args=(child,), daemon=True).start()
        return child

    def _stream(self, child: Child) -> None:
        assert child.process.stdout is not None
        for line in child.process.stdout:
            with self.output_lock:
                print(f"[{child.name}] {line}", end="", flush=True)

    def wait_healthy(self, child: Child, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if child.process.poll() is not None:
                    raise LaunchError(f"{child.name} exited with {child.process.returncode} while starting")
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise LaunchError(f"{child.name} at {address} not healthy after {timeout:g}s")

    def watch_workers(self) -> None:
        """Return when every worker exited 0; raise naming the first child that failed."""
        while True:
            for child in self.children:
                code = child.process.poll()
                if code is not None and (code != 0 or child.server):
                    raise LaunchError(f"{child.name} exited with status {code}")
            if all(c.process.poll() == 0 for c in self.children if not c.server):
                return
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left: no orphans."""
        for child in reversed(self.children):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(child.process, signal.SIGKILL)  # any rank mpiexec left behind
            child.process.wait()


def _signal_group(process: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _nanodist(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanodist.workers.cli", *args]


def launch(cluster: Cluster, s: dict[str, Any]) -> dict[str, Any]:
    groups = parse_groups(str(s["groups"]))
    stages = int(s["pipeline_stages"])
    if stages > 1 and groups[0][1] != stages:
        raise LaunchError(f"--pipeline-stages {stages}: every group is one pipeline replica, so needs {stages} ranks")
    pushers = sum(size for _, size in groups) if s["flat"] else len(groups)
    ports = {"barrier": free_port(), "lock": free_port()}
    shard_ports = [free_port() for _ in range(int(s["shards"]))]
    for i, port in enumerate(shard_ports):
        child = cluster.spawn(
            f"ps-{i}",
            _nanodist(
                "serve",
                "ps",
                "--port",
                str(port),
                "--mode",
                s["mode"],
                "--num-workers",
                str(pushers),
                "--staleness",
                str(s["staleness"]),
            ),
            server=True,
        )
        cluster.wait_healthy(child, f"127.0.0.1:{port}", s["startup_timeout"])
    for role in ("barrier", "lock"):
        child = cluster.spawn(role, _nanodist("serve", role, "--port", str(ports[role])), server=True)
        cluster.wait_healthy(child, f"127.0.0.1:{ports[role]}", s["startup_timeout"])

    common = [
        "--ps",
        ",".join(f"127.0.0.1:{p}" for p in shard_ports),
        "--barrier",
        f"127.0.0.1:{ports['barrier']}",
        "--lock",
        f"127.0.0.1:{ports['lock']}",
        "--run-id",
        s["run_id"],
        "--runs-dir",
        s["runs_dir"],
        "--num-groups",
        str(len(groups)),
        "--group-size",
        str(groups[0][1]),
        "--mode",
        s["mode"],
        "--staleness",
        str(s["staleness"]),
        "--epochs",
        str(s["epochs"]),
        "--batch-size",
        str(s["batch_size"]),
        "--lr",
        str(s["lr"]),
        "--hidden",
        str(s["hidden"]),
        "--seed",
        str(s["seed"]),
        "--max-steps",
        str(s["max_steps"]),
        "--timeout",
        str(s["timeout"]),
        "--pipeline-stages",
        str(s["pipeline_stages"]),
        "--micro-batches",
        str(s["micro_batches"]),
        "--schedule",
        str(s["schedule"]),
    ] + (["--flat"] if s["flat"] else [])
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    for gid, (backend, size) in enumerate(groups):
        argv = _nanodist("worker", "--backend", backend, "--group-id", str(gid), *common)
        if backend == "mpi":
            if mpiexec is None:
                raise LaunchError("an mpi group needs mpiexec (pip install mpich)")
            cluster.spawn(f"group{gid}-mpi", [mpiexec, "-n", str(size), *argv])
        else:
            for r in range(size):
                cluster.spawn(f"group{gid}-tcp-{r}", argv)
    cluster.watch_workers()
    with open(os.path.join(s["runs_dir"], s["run_id"], "metrics.json")) as f:
        return json.load(f)


def run(args: argparse.Namespace) -> None:
    cluster = Cluster()
    began = time.monotonic()

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        s = settings(args)
        print(f"nanodist up: run {s['run_id']}, groups {s['groups']}, {s['shards']} shards, {s['mode']}", flush=True)
        metrics = launch(cluster, s)
    except KeyboardInterrupt:
        cluster.stop()
        print("nanodist up: interrupted; every process stopped", file=sys.stderr)
        raise SystemExit(130) from None
    except (LaunchError, OSError) as error:
        cluster.stop()
        print(f"nanodist up: failed: {error}; every process stopped", file=sys.stderr)
        raise SystemExit(1) from None
    cluster.stop()
    run_dir = os.path.join(s["runs_dir"], s["run_id"])
    print(f"\nnanodist up: run {s['run_id']} finished in {time.monotonic() - began:.1f} s", flush=True)
    layout = "flat" if s["flat"] else "hierarchical"
    if int(s["pipeline_stages"]) > 1:
        layout = f"{s['pipeline_stages']}-stage pipeline x {len(parse_groups(str(s['groups'])))} replicas"
    print(
        f"  test accuracy {metrics['final_test_accuracy']:.4f} after {len(metrics['epochs'])} epochs "
        f"({metrics['world_size']} workers, {s['mode'].upper()}, {layout})"
    )
    print(f"  metrics: {os.path.join(run_dir, 'metrics.json')}")
    print(f"  plot:    {os.path.join(run_dir, 'training.png')}", flush=True)
