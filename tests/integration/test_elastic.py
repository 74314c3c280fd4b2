"""Elastic training with real processes: a TCP group loses a worker to kill -9 and finishes without it."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid

import pytest

from tests.conftest import nanodist_command

pytestmark = pytest.mark.slow  # trains, or runs the whole cluster: make test, not test-fast


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


@pytest.mark.parametrize(
    ("victim_rank", "layout"),
    # The group leader, who talks to the servers, and a member; in flat mode every worker pushes, and the
    # servers (started for one pusher) average each step over the pushers of the generation that pushed it.
    [(0, "hierarchical"), (2, "hierarchical"), (1, "flat")],
)
def test_a_group_of_three_loses_a_worker_to_kill_9_and_finishes_with_two(start_server, tmp_path, victim_rank, layout):
    flat = ["--flat"] if layout == "flat" else []
    # All three in the first generation, however slowly they start: it closes once the third is in.
    run_id, workers = start_workers(
        start_server,
        tmp_path,
        3,
        "--epochs",
        "8",
        "--min-workers",
        "2",
        "--join-window",
        "30",
        "--max-workers",
        "3",
        *flat,
    )
    ranks = [group_rank(w) for w in workers]
    victim = workers[ranks.index(victim_rank)]
    survivors = [w for w in workers if w is not victim]
    kill_once_training(victim)
    outputs = [w.communicate(timeout=240)[0] for w in survivors]
    logged = "".join(outputs)
    assert [w.returncode for w in survivors] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert logged.count("generation 1: 2 workers (was 3)") == 1, logged[-3000:]  # logged once, by the new rank 0
    assert f":{victim.pid})" in logged.split("generation 1: 2 workers (was 3)")[1].splitlines()[0]  # names who left
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final_test_accuracy"] >= 0.95, metrics["epochs"]
    assert [e["epoch"] for e in metrics["epochs"]][-1] == 8


def test_below_min_workers_the_job_stops_naming_who_left(start_server, tmp_path):
    # Both in the first generation, however slowly they start: it closes once the second is in.
    _, (survivor, victim) = start_workers(
        start_server, tmp_path, 2, "--epochs", "1000", "--min-workers", "2", "--join-window", "30", "--max-workers", "2"
    )
    kill_once_training(victim)
    output = survivor.communicate(timeout=120)[0]
    assert survivor.returncode == 2, output[-3000:]
    assert "only 1 workers are left in generation 1, fewer than --min-workers 2" in output
    assert f":{victim.pid})" in output


class Output:
    """A worker's output lines as they come, each with the time it was read."""

    def __init__(self, worker: subprocess.Popen[str]) -> None:
        self.worker = worker
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.worker.stdout is not None
        for line in self.worker.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, text: str, timeout: float = 120) -> float:
        """When the first line holding `text` was read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [at for at, line in list(self.lines) if text in line]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout:g}s:\n{self.text[-3000:]}")

    def finish(self, timeout: float = 240) -> int:
        try:
            code = self.worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.worker.kill()  # what it printed tells where it stuck; the test's own timeout would hide it
            self._reader.join(timeout=10)
            raise AssertionError(
                f"pid {self.worker.pid} still running after {timeout:g}s:\n{self.text[-4000:]}"
            ) from None
        self._reader.join(timeout=10)
        return code

    @property
    def text(self) -> str:
        return "".join(line for _, line in list(self.lines))


def finish_all(outputs: list[Output], timeout: float) -> list[int]:
    """Every worker's exit code; if one is still running after `timeout`, all are stopped and the
    failure shows what each printed (a stuck worker is explained by where the others stand)."""
    deadline = time.monotonic() + timeout
    try:
        return [o.finish(timeout=max(1.0, deadline - time.monotonic())) for o in outputs]
    except AssertionError:
        for o in outputs:
            o.worker.kill()
        tails = "\n".join(f"--- pid {o.worker.pid}:\n{o.text[-3000:]}" for o in outputs)
        raise AssertionError(f"workers still running after {timeout:g}s:\n{tails}") from None


def test_a_worker_started_mid_training_joins_at_an_epoch_boundary_and_takes_a_share(start_server, tmp_path):
    run_id, first = start_workers(start_server, tmp_path, 2, "--epochs", "20", "--slow-ms", "10", "--min-workers", "2")
    outputs = [Output(w) for w in first]
    outputs[0].first(" step ")
    late = subprocess.Popen(first[0].args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs.append(Output(late))
    assert finish_all(outputs, timeout=240) == [0, 0, 0], [o.text[-2000:] for o in outputs]
    joiner = outputs[2].text
    assert "waiting to join the next one" in joiner and "generation 1: resuming at step" in joiner, joiner[-3000:]
    resumed = joiner.split("generation 1: resuming at step")[1]
    assert " step " in resumed, joiner[-3000:]  # it trained batches of its own
    logged = "".join(o.text for o in outputs)
    (change,) = [line for line in logged.splitlines() if "generation 1: 3 workers (was 2)" in line]
    assert "left: none; joined: " in change and f":{late.pid}" in change, change
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["world_size"] == 3 and metrics["final_test_accuracy"] >= 0.95, metrics["epochs"]
    assert len(metrics["epochs"]) == 20


def test_a_frozen_worker_is_left_behind_within_the_lease_ttl_and_stops_itself_when_it_wakes(start_server, tmp_path):
    """A frozen process keeps its sockets open: only the barrier's session lease can tell the others."""
    # A join window long enough that, under load, no worker starts late and enters a later generation;
    # the group closes as soon as the third is in.
    run_id, workers = start_workers(
        start_server, tmp_path, 3, "--epochs", "10", "--min-workers", "2", "--join-window", "10", "--max-workers", "3"
    )
    outputs = [Output(w) for w in workers]
    for o in outputs:
        o.first(" step ")
    assert all(" of 3\n" in o.text.split(" member ")[1] for o in outputs), [o.text[-2000:] for o in outputs]
    ranks = [int(o.text.split(" member ")[1].split()[0]) for o in outputs]
    frozen = outputs[ranks.index(1)]
    survivors = [o for o in outputs if o is not frozen]
    frozen.worker.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    noticed = max(o.first("leaves generation 0") for o in survivors) - stopped_at
    frozen.worker.send_signal(signal.SIGCONT)
    assert frozen.finish(timeout=60) == 1, frozen.text[-3000:]
    assert "the job goes on without it" in frozen.text, frozen.text[-3000:]
    assert [o.finish() for o in survivors] == [0, 0], [o.text[-2000:] for o in survivors]
    # Well before the workers' --timeout of 60 s: the frozen worker's session lease told them. How soon (its
    # TTL and half a second of watching) depends on the machine's load; bench/recovery.py measures it.
    assert noticed < 30, f"the survivors needed {noticed:.1f} s"
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final_test_accuracy"] >= 0.95, metrics["epochs"]
    print(f"\nthe survivors of a frozen worker went on {noticed:.2f} s after it stopped")


def test_beyond_max_workers_a_worker_waits_for_a_place_and_says_why_it_gave_up(start_server, tmp_path):
    # A job far longer than the waiting worker's --timeout, stopped once that worker gave up: a job that
    # finished first would rightly tell it so (exit 0) instead, and how fast training goes is not the test.
    _, workers = start_workers(start_server, tmp_path, 3, "--epochs", "100000", "--max-workers", "2", "--timeout", "8")
    outputs = [Output(w) for w in workers]
    try:
        refused = next_to_exit(outputs, timeout=120)
        assert refused.worker.returncode == 2, refused.text[-2000:]
        assert "waiting to join the next one" in refused.text, refused.text[-2000:]
        assert "it is full (--max-workers 2)" in refused.text, refused.text[-2000:]
        training = [o for o in outputs if o is not refused]
        assert all(o.worker.poll() is None for o in training), [o.text[-2000:] for o in training]
        for o in training:  # the job trains on with the two it has room for, whether they began together or not
            o.first(" of 2\n")
            sizes = [line.rsplit(" of ", 1)[1].strip() for _, line in list(o.lines) if "] member " in line]
            assert sizes and set(sizes) <= {"1", "2"} and sizes[-1] == "2", o.text[-2000:]
    finally:
        for o in outputs:
            o.worker.kill()
            o.finish()


def next_to_exit(outputs: list[Output], timeout: float) -> Output:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for o in outputs:
            if o.worker.poll() is not None:
                o.finish()
                return o
        time.sleep(0.1)
    raise AssertionError(f"no worker exited within {timeout:g} s: {[o.text[-1000:] for o in outputs]}")


def test_a_worker_that_arrives_after_the_job_finished_stops_at_once_saying_so(start_server, tmp_path):
    run_id, workers = start_workers(start_server, tmp_path, 2, "--epochs", "1")
    for worker in workers:
        output = worker.communicate(timeout=120)[0]
        assert worker.returncode == 0, output[-2000:]
    began = time.monotonic()
    late = subprocess.run(workers[0].args, capture_output=True, text=True, timeout=60)
    assert late.returncode == 0, late.stdout[-2000:] + late.stderr[-2000:]
    assert f"run {run_id!r} finished while this worker waited for a place in it; nothing to do" in late.stdout
    assert time.monotonic() - began < 40  # not the --timeout of 60 s
