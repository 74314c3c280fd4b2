"""A docker compose project of the nanodist files, with free host ports and a runs folder of its own."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

from tests.conftest import ROOT, free_host_port

COMPOSE = ["docker-compose"]


class Cluster:
    def __init__(self, tmp_path, **settings: str) -> None:
        self.project = f"nde2e{uuid.uuid4().hex[:8]}"
        self.runs = tmp_path / "runs"
        self.runs.mkdir()
        self.run_id = "e2e"
        self.files: list[str] = []  # extra `-f` files; the default docker-compose.yml otherwise
        self.env = {
            **os.environ,
            "NANODIST_RUN_ID": self.run_id,
            "NANODIST_RUNS_HOST_DIR": str(self.runs),
            "PS0_PORT": str(free_host_port()),
            "PS1_PORT": str(free_host_port()),
            "LOCK_PORT": str(free_host_port()),
            "PS0_METRICS_PORT": str(free_host_port()),
            "PS1_METRICS_PORT": str(free_host_port()),
            **settings,
        }

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*COMPOSE, "-p", self.project, *self.files, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def state(self, container: str) -> dict:
        out = subprocess.run(["docker", "inspect", container], capture_output=True, text=True, check=True).stdout
        return json.loads(out)[0]

    def logs(self, container: str) -> str:
        result = subprocess.run(["docker", "logs", container], capture_output=True, text=True, check=False)
        return result.stdout + result.stderr

    def wait_exited(self, containers: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(self.state(c)["State"]["Running"] for c in containers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout:g}s")
            time.sleep(1)

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "5")
