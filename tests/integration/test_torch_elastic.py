"""nd.elastic.run with real processes: a torch script that loses a worker to kill -9, or gains one,
goes on, and its workers end with equal parameters having trained on disjoint samples."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest

from nanodist.workers.config import JobConfig
from nanodist.workers.settings import to_environment
from tests.conftest import nanodist_command
from tests.integration.test_elastic import Output, finish_all
from tests.integration.test_torch import SCRIPTS

pytestmark = pytest.mark.slow  # trains, or runs the whole cluster: make test, not test-fast

SCRIPT = os.path.join(SCRIPTS, "elastic.py")


def finished(out) -> tuple[list[dict[str, np.ndarray]], list[dict[str, list[int]]]]:
    """The parameters and the samples per epoch of every worker that finished."""
    params = [dict(np.load(f, allow_pickle=False)) for f in sorted(glob.glob(str(out / "worker-*.npz")))]
    samples = [json.loads(open(f).read()) for f in sorted(glob.glob(str(out / "samples-*.json")))]
    return params, samples


def assert_equal_everywhere(params: list[dict[str, np.ndarray]]) -> None:
    for rank, state in enumerate(params[1:], start=1):
        for name, value in state.items():
            np.testing.assert_array_equal(value, params[0][name], err_msg=f"worker {rank} differs: {name}")


def test_a_script_under_elastic_run_survives_losing_a_worker(tmp_path):
    command = nanodist_command(
        "run", "--runs-dir", str(tmp_path / "runs"), "--timeout", "30", "--elastic", "--groups", "tcp:3",
        # All three in the first generation, however slowly they start; it closes once the third is in.
        "--join-window", "10", "--max-workers", "3",
        "--min-workers", "2", SCRIPT, str(tmp_path), "2",
    )  # fmt: skip
    run = Output(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    run.first("epoch 0 batch 6:")  # inside the first epoch, between two commits
    victim = int((tmp_path / "pid-0").read_text())  # rank 0: the new generation needs a new leader
    os.kill(victim, signal.SIGKILL)
    assert run.finish() == 0, run.text[-4000:]
    assert "exited with status -9; the others go on" in run.text
    (change,) = [line for line in run.text.splitlines() if "generation 1: 2 workers (was 3)" in line]
    assert "left: rank 0 (" in change and f":{victim})" in change, change
    assert run.text.count("reset: rank") == 2  # the callbacks ran on both survivors
    params, samples = finished(tmp_path)
    assert len(params) == 2
    assert_equal_everywhere(params)
    for epoch in ("0", "1"):  # the rest of an epoch is split over the survivors: no sample twice
        a, b = (set(s[epoch]) for s in samples)
        assert not a & b, f"epoch {epoch}: {len(a & b)} samples trained on twice"
    assert len(set(samples[0]["1"]) | set(samples[1]["1"])) == 1796  # a whole epoch of digits' 1797, over 2
    accuracy = float(run.text.split("accuracy ")[-1].split()[0])
    assert accuracy >= 0.9, run.text[-2000:]


@pytest.mark.timeout(900)  # 76 s idle here, 83 s three at once, 211 s under the whole suite's load
def test_a_worker_started_mid_training_enters_at_a_commit_and_takes_a_share(start_server, tmp_path):
    ps, barrier, lock = start_server("ps"), start_server("barrier"), start_server("lock")
    config = JobConfig(
        ps=(ps.address,), barrier=barrier.address, lock=lock.address, run_id=f"elastic-{uuid.uuid4().hex[:8]}",
        backend="tcp", group_size=0, elastic=True, join_window=10.0, timeout=60,
        session_ttl=20.0,  # no worker is lost here: a loaded machine's pauses must not leave one behind
    )  # fmt: skip
    env = {**os.environ, **to_environment(config), "PYTHONUNBUFFERED": "1"}
    # 3 epochs with a pause after each batch. The late worker starts with the others (torch's import takes
    # long under load) and joins once the gate opens, so that it enters early however slow the machine.
    gate = tmp_path / "gate"
    command = [sys.executable, SCRIPT, str(tmp_path), "3", "0.08"]

    def start(*gated: str) -> Output:
        popen = subprocess.Popen(
            [*command, *gated], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        return Output(popen)

    first, late = [start(), start()], start(str(gate))
    first[0].first("epoch 0 batch 2:")
    gate.touch()
    outputs = [*first, late]
    assert finish_all(outputs, timeout=700) == [0, 0, 0], [o.text[-2000:] for o in outputs]
    logged = "".join(o.text for o in outputs)
    (change,) = [line for line in logged.splitlines() if "generation 1: 3 workers (was 2)" in line]
    assert "joined: " in change and f":{late.worker.pid}" in change, change
    assert re.search(r"batch \d+: rank \d of 3", late.text), late.text[-2000:]  # it trained in the group of 3
    params, samples = finished(tmp_path)
    assert len(params) == 3
    assert_equal_everywhere(params)
    for epoch in ("0", "1", "2"):  # no sample of an epoch trained on twice, and none left out but a tail
        parts = [set(s.get(epoch, [])) for s in samples]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), epoch
        assert len(parts[0] | parts[1] | parts[2]) >= 1797 - 2, epoch  # a tail shorter than the group
    assert all(sum(len(s.get(e, [])) for e in ("0", "1", "2")) > 0 for s in samples)  # each took a share


def test_a_script_under_elastic_run_survives_losing_an_mpi_rank_and_the_restarted_group_rejoins(tmp_path):
    """An MPI group cannot shrink: losing a rank, it leaves whole; the TCP group goes on through the servers'
    averages alone, and the group, started again by `nanodist run --max-restarts`, enters at a commit."""
    command = nanodist_command(
        "run", "--runs-dir", str(tmp_path / "runs"), "--timeout", "30", "--elastic", "--groups", "mpi:2,tcp:2",
        "--max-restarts", "1", "--join-window", "10", "--min-workers", "2", SCRIPT, str(tmp_path), "4", "0.08",
    )  # fmt: skip
    run = Output(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    run.first("epoch 0 batch 6:")
    victim = int((tmp_path / "pid-0").read_text())  # rank 0 leads the MPI group, the first of the job
    os.kill(victim, signal.SIGKILL)
    assert run.finish() == 0, run.text[-4000:]
    assert "mpi group 0 exited with status" in run.text and "starting it again (restart 1 of 1)" in run.text
    # The survivors' regroup and the group's restart race: the restarted group may enter the generation
    # that the loss starts (4 workers again) or a later one (2, then 4). Either way the loss is logged once,
    # naming the killed rank, the restarted ranks are logged as joining, and the job ends with 4 workers.
    changes = [line for line in run.text.splitlines() if re.search(r"generation \d+: \d+ workers \(was \d+\)", line)]
    (left,) = [line for line in changes if f":{victim})" in line.split("joined:")[0]]
    assert "left: rank 0 (" in left, changes
    assert any("joined: none" not in line for line in changes), changes
    assert re.search(r"generation \d+: 4 workers", changes[-1]), changes
    params, _ = finished(tmp_path)
    assert len(params) == 4  # the TCP pair and the restarted MPI pair
    assert_equal_everywhere(params)
    accuracy = float(run.text.split("accuracy ")[-1].split()[0])
    assert accuracy >= 0.9, run.text[-2000:]
