"""Pipeline parallelism with real processes: equivalence with one process, and a killed stage."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import nanodist_command
from tests.integration.reference import assert_matches_single_process

pytestmark = pytest.mark.slow  # trains, or runs the whole cluster: make test, not test-fast

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
HIDDEN = (32, 32, 16)  # four layers: enough for three stages


def cluster(start_server, replicas: int) -> list[str]:
    shards = [start_server("ps", "--mode", "bsp", "--num-workers", str(replicas)) for _ in range(2)]
    return [
        "--ps",
        ",".join(s.address for s in shards),
        "--barrier",
        start_server("barrier").address,
        "--lock",
        start_server("lock").address,
    ]


def pipeline_replica(backend: str, stages: int, group: int, args: list[str], **popen) -> list[subprocess.Popen]:
    worker = ["worker", "--backend", backend, "--group-id", str(group), "--group-size", str(stages), *args]
    if backend == "mpi":
        return [subprocess.Popen([MPIEXEC, "-n", str(stages), *nanodist_command(*worker)], **popen)]
    return [subprocess.Popen(nanodist_command(*worker), **popen) for _ in range(stages)]


CASES = {  # name: (backends of the replicas, stages, micro-batches, schedule)
    "tcp-2-stages": (["tcp"], 2, 4, "1f1b"),
    "tcp-3-stages": (["tcp"], 3, 4, "1f1b"),
    "mpi-2-stages": (["mpi"], 2, 4, "gpipe"),
    "mpi-3-stages": (["mpi"], 3, 8, "1f1b"),
    "2-replicas-mpi-and-tcp": (["mpi", "tcp"], 2, 2, "1f1b"),
}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_training_equals_single_process_training(start_server, tmp_path, case):
    backends, stages, micro, kind = CASES[case]
    steps, lr, batch, seed = 5, 0.3, 16, 7
    run_id = f"pipe-{uuid.uuid4().hex[:8]}"
    dump = tmp_path / "params.npz"
    args = [
        *cluster(start_server, len(backends)),
        *("--run-id", run_id, "--runs-dir", str(tmp_path), "--num-groups", str(len(backends))),
        *("--pipeline-stages", str(stages), "--micro-batches", str(micro), "--schedule", kind),
        *("--hidden", ",".join(map(str, HIDDEN)), "--epochs", "1", "--max-steps", str(steps)),
        *("--lr", str(lr), "--batch-size", str(batch), "--seed", str(seed), "--dump-params", str(dump)),
        *("--timeout", "60"),
    ]
    procs = [p for group, backend in enumerate(backends) for p in pipeline_replica(backend, stages, group, args)]
    assert [p.wait(timeout=180) for p in procs] == [0] * len(procs)
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["world_size"] == stages * len(backends)
    assert {w["stage"] for w in metrics["timings"]["per_worker"].values()} == set(range(stages))

    assert_matches_single_process(
        dump, (64, *HIDDEN, 10), shards=len(backends), steps=steps, lr=lr, batch=batch, seed=seed
    )


def test_a_killed_stage_is_named_by_the_other_stages_and_nothing_hangs(start_server, tmp_path):
    args = [
        *cluster(start_server, 1),
        *("--run-id", f"pipe-kill-{uuid.uuid4().hex[:8]}", "--runs-dir", str(tmp_path)),
        *("--pipeline-stages", "3", "--hidden", ",".join(map(str, HIDDEN)), "--epochs", "1000", "--timeout", "20"),
    ]
    stages = pipeline_replica("tcp", 3, 0, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = stages[1]
    for line in victim.stdout:  # "[replica 0 stage S] epoch 1/1000 step ..."
        if " step " in line:
            dead_stage = int(re.search(r"stage (\d+)", line).group(1))
            break
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait()
    errors = []
    for process in stages:
        if process is not victim:
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 1, stderr[-2000:]
            errors.append(stderr)
    assert time.monotonic() - killed_at < 20, "the comm timeout is 20 s; a closed connection is seen at once"
    named = [e for e in errors if f"lost the connection to stage {dead_stage}" in e]
    assert named, "\n".join(e[-1500:] for e in errors)
    assert all("pipeline stage" in e or "aborted" in e or "broken" in e for e in errors), errors


def test_up_runs_the_pipeline_example_to_95_percent(tmp_path):
    run_id = f"demo-pipe-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        nanodist_command(
            "up", "--run-id", run_id, "--runs-dir", str(tmp_path), "--pipeline-stages", "2", "--hidden", "128,64"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95 and metrics["world_size"] == 4
    assert "2-stage pipeline x 2 replicas" in result.stdout
    assert (tmp_path / run_id / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_worker = metrics["timings"]["per_worker"].values()
    assert sorted(w["stage"] for w in per_worker) == [0, 0, 1, 1]
    assert all(0 <= w["bubble"] < 1 for w in per_worker)
