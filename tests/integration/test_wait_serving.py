"""Workers order their own start-up: they wait for the services' health checks, so no orchestrator has to."""

import json
import subprocess
import time

import pytest

from nanodist.client import Unavailable
from nanodist.client.health import wait_serving
from tests.conftest import free_port, nanodist_command


@pytest.mark.slow
def test_a_worker_started_before_its_services_waits_for_them_and_trains(start_server, tmp_path):
    ports = {role: free_port() for role in ("ps", "barrier", "lock")}
    address = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
    worker = subprocess.Popen(
        nanodist_command(
            "worker",
            *("--ps", address["ps"], "--barrier", address["barrier"], "--lock", address["lock"]),
            *("--run-id", "late", "--runs-dir", str(tmp_path), "--epochs", "1", "--max-steps", "5"),
            *("--timeout", "60"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert worker.stdout is not None
    first = worker.stdout.readline()  # it waits before any service exists (however slowly it started)
    assert f"waiting for the services: {address['lock']} unreachable" in first, first
    # The services come up in an order of their own.
    start_server("ps", port=ports["ps"])
    start_server("lock", port=ports["lock"])
    start_server("barrier", port=ports["barrier"])
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, first + output
    assert "every service is serving after" in output
    assert json.loads((tmp_path / "late" / "metrics.json").read_text())["world_size"] == 1


def test_the_wait_is_bounded_and_names_what_is_missing(start_server):
    serving = start_server("barrier").address
    missing = f"127.0.0.1:{free_port()}"
    lines: list[str] = []
    began = time.monotonic()
    with pytest.raises(Unavailable, match=f"services not serving after 1.5 s: {missing} unreachable$"):
        wait_serving([serving, missing], timeout=1.5, log=lines.append)
    assert 1.5 <= time.monotonic() - began < 5
    assert lines and all(missing in line and serving not in line for line in lines)
    wait_serving([serving], timeout=1, log=lines.append)  # at once, and silent
    assert len(lines) == 1
