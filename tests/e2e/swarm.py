"""A single-node Docker Swarm that the tests make and leave, and nanodist stacks deployed on it."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass

from tests.conftest import ROOT, free_host_port

STATE_LABELS = ("nanodist.ps-0", "nanodist.ps-1", "nanodist.lock")  # docker-stack.yml's placement constraints
DONE = ("Complete", "Failed", "Rejected", "Shutdown", "Orphaned")


def docker(*args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120) -> str:
    result = subprocess.run(
        ["docker", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def swarm_state() -> str:
    return docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def init_swarm() -> None:
    """A swarm of this engine alone, its node labelled for the services that keep state."""
    try:
        docker("swarm", "init")
    except RuntimeError:  # more than one address to advertise: any will do for a swarm of one node
        docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    node = docker("info", "--format", "{{.Swarm.NodeID}}").strip()
    docker("node", "update", *(f"--label-add={label}=true" for label in STATE_LABELS), node)


def leave_swarm() -> None:
    docker("swarm", "leave", "--force", check=False)


@dataclass
class Task:
    name: str
    state: str  # "Running 3 seconds ago", "Complete 1 second ago", "Failed 2 seconds ago", ...
    error: str

    @property
    def done(self) -> bool:
        return self.state.startswith(DONE)


class Stack:
    """One deployment of the stack files, with free host ports; the `runs` volume holds the metrics."""

    def __init__(self, *files: str, **settings: str) -> None:
        self.name = f"nde2e{uuid.uuid4().hex[:8]}"
        self.files = files
        self.run_id = "e2e"
        self.env = {
            **os.environ,
            "NANODIST_RUN_ID": self.run_id,
            "PS0_PORT": str(free_host_port()),
            "PS1_PORT": str(free_host_port()),
            "LOCK_PORT": str(free_host_port()),
            "PS0_METRICS_PORT": str(free_host_port()),
            "PS1_METRICS_PORT": str(free_host_port()),
            **settings,
        }

    def deploy(self) -> None:
        files = [arg for f in self.files for arg in ("-c", f)]
        # The image is this engine's own: no registry is asked for its digest.
        docker("stack", "deploy", "--resolve-image", "never", *files, self.name, env=self.env)

    def tasks(self, service: str) -> list[Task]:
        out = docker("service", "ps", "--no-trunc", "--format", "{{json .}}", f"{self.name}_{service}")
        rows = [json.loads(line) for line in out.splitlines()]
        return [Task(r["Name"], r["CurrentState"], r["Error"]) for r in rows]

    def containers(self, service: str) -> list[str]:
        label = f"label=com.docker.swarm.service.name={self.name}_{service}"
        return docker("ps", "-aq", "--filter", label).split()

    def logs(self, service: str) -> str:
        """What every task of the service wrote, its stdout then its stderr (where the servers log)."""
        command = ["docker", "service", "logs", "--raw", f"{self.name}_{service}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        return result.stdout + result.stderr

    def wait_done(self, services: list[str], timeout: float) -> list[Task]:
        """Every task of `services` once all have ended (none is restarted: the workers' policy is none)."""
        deadline = time.monotonic() + timeout
        while True:
            tasks = [t for s in services for t in self.tasks(s)]
            if tasks and all(t.done for t in tasks):
                return tasks
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks still running after {timeout:g}s: {tasks}")
            time.sleep(1)

    def read_runs(self, path: str) -> str:
        """A file of the stack's `runs` volume, read through a throwaway container of the image."""
        image = f"nanodist:{self.env.get('NANODIST_VERSION', '0.1.0')}"
        volume = f"{self.name}_runs:/runs:ro"
        return docker("run", "--rm", "-v", volume, "--entrypoint", "cat", image, f"/runs/{path}")

    def remove(self) -> None:
        """The services, then (once their containers are gone) the volumes; a swarm's network goes by itself."""
        docker("stack", "rm", self.name, check=False)
        label = f"label=com.docker.stack.namespace={self.name}"
        deadline = time.monotonic() + 60
        while docker("ps", "-aq", "--filter", label).split() and time.monotonic() < deadline:
            time.sleep(1)
        volumes = docker("volume", "ls", "-q", "--filter", label).split()
        if volumes:
            docker("volume", "rm", *volumes, check=False)
