"""Elastic training with real processes: a TCP group loses a worker to kill -9 and finishes without it."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid

import pytest

from tests.conftest import nanodist_command


def start_workers(start_server, tmp_path, count: int, *extra: str) -> tuple[str, list[subprocess.Popen[str]]]:
    ps = start_server("ps", "--mode", "bsp", "--num-workers", "1")
    barrier, lock = start_server("barrier"), start_server("lock")
    run_id = f"elastic-{uuid.uuid4().hex[:8]}"
    command = nanodist_command(
        "worker",
        *("--backend", "tcp", "--group-size", "0", "--elastic", "--join-window", "2"),
        *("--ps", ps.address, "--barrier", barrier.address, "--lock", lock.address),
        *("--run-id", run_id, "--runs-dir", str(tmp_path), "--timeout", "60", *extra),
    )
    workers = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(count)
    ]
    return run_id, workers


def kill_once_training(victim: subprocess.Popen[str]) -> None:
    assert victim.stdout is not None
    for line in victim.stdout:
        if " step " in line:  # training is under way: the kill lands inside an epoch
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait()


def group_rank(worker: subprocess.Popen[str]) -> int:
    """The rank a worker printed when its group formed ("member R of N")."""
    assert worker.stdout is not None
    for line in worker.stdout:
        if " member " in line:
            return int(line.split(" member ")[1].split()[0])
    raise AssertionError("the worker never joined its group")


@pytest.mark.parametrize("victim_rank", [0, 2])  # the group leader, who talks to the servers, and a member
def test_a_group_of_three_loses_a_worker_to_kill_9_and_finishes_with_two(start_server, tmp_path, victim_rank):
    run_id, workers = start_workers(start_server, tmp_path, 3, "--epochs", "8", "--min-workers", "2")
    ranks = [group_rank(w) for w in workers]
    victim = workers[ranks.index(victim_rank)]
    survivors = [w for w in workers if w is not victim]
    kill_once_training(victim)
    outputs = [w.communicate(timeout=240)[0] for w in survivors]
    for worker, output in zip(survivors, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    logged = "".join(outputs)
    assert logged.count("generation 1: 2 workers (was 3)") == 1, logged[-3000:]  # logged once, by the new rank 0
    assert f":{victim.pid})" in logged.split("generation 1: 2 workers (was 3)")[1].splitlines()[0]  # names who left
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final_test_accuracy"] >= 0.95, metrics["epochs"]
    assert [e["epoch"] for e in metrics["epochs"]][-1] == 8


def test_below_min_workers_the_job_stops_naming_who_left(start_server, tmp_path):
    _, (survivor, victim) = start_workers(start_server, tmp_path, 2, "--epochs", "1000", "--min-workers", "2")
    kill_once_training(victim)
    output = survivor.communicate(timeout=120)[0]
    assert survivor.returncode == 2, output[-3000:]
    assert "only 1 workers are left in generation 1, fewer than --min-workers 2" in output
    assert f":{victim.pid})" in output
