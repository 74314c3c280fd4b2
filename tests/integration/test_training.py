import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from tests.conftest import nanodist_command
from tests.integration.reference import assert_matches_single_process

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))


def processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{pid}: {cmdline}")
    return found


def up(tmp_path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, str]:
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        nanodist_command("up", "--run-id", run_id, "--runs-dir", str(tmp_path), *args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, run_id


@pytest.mark.slow
def test_up_trains_digits_to_95_percent_and_leaves_nothing_behind(tmp_path):
    result, run_id = up(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95
    assert len(metrics["epochs"]) == 10 and metrics["world_size"] == 4
    tokens = [e["eval_fencing_token"] for e in metrics["epochs"]]
    assert tokens == sorted(set(tokens)), "each evaluation held the eval lock with a newer token"
    timings = metrics["timings"]["mean_ms_per_step"]
    assert {"step", "compute", "allreduce", "push", "pull", "broadcast", "wait"} <= set(timings)
    assert (tmp_path / run_id / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"test accuracy {metrics['final_test_accuracy']:.4f} after 10 epochs" in result.stdout
    assert processes_mentioning(run_id) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["asp", "ssp"])
def test_asynchronous_modes_converge(tmp_path, mode):
    result, run_id = up(tmp_path, "--mode", mode, "--staleness", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.93


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_exits_non_zero(tmp_path):
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    process = subprocess.Popen(
        nanodist_command("up", "--run-id", run_id, "--runs-dir", str(tmp_path), "--epochs", "1000"),
        stdout=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell's background job (CI started with `&`, say) inherits SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:
        if "epoch 1/1000 step" in line:
            break
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)  # read on: a launcher whose output pipe is full would wait to print
    assert process.returncode == 130
    assert processes_mentioning(run_id) == []


@pytest.mark.slow
def test_a_failing_worker_stops_the_cluster_and_is_named(tmp_path):
    result, run_id = up(tmp_path, "--batch-size", "5000", timeout=120)
    assert result.returncode == 1
    assert "exceeds the shard" in result.stdout
    assert "failed: group" in result.stderr and "exited with status 2" in result.stderr
    assert processes_mentioning(run_id) == []


def elastic_up_losing_a_worker(
    tmp_path, *extra: str, epochs: int = 6, groups: str = "tcp:3", backend: str = "tcp"
) -> tuple[str, int, dict]:
    """`nanodist up --elastic`, one worker of `backend` killed with kill -9 in epoch 2: the output, the
    victim's pid and the metrics."""
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    command = ["up", "--run-id", run_id, "--runs-dir", str(tmp_path), "--groups", groups, "--elastic", *extra]
    command += ["--join-window", "10"]  # all three in the first generation, however slowly they start
    process = subprocess.Popen(
        nanodist_command(*command, "--min-workers", "2", "--epochs", str(epochs)), stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        if f"epoch 2/{epochs} step" in line:
            break
    workers = [
        p
        for p in processes_mentioning(run_id)
        if "nanodist.workers.cli worker " in p and f"--backend={backend} " in p and "mpiexec" not in p
    ]
    victim = int(workers[0].split(":")[0])
    os.kill(victim, signal.SIGKILL)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output[-3000:]
    assert "left: rank" in output and f":{victim})" in output, output[-3000:]  # named as it left
    assert processes_mentioning(run_id) == []
    return output, victim, json.loads((tmp_path / run_id / "metrics.json").read_text())


@pytest.mark.slow
def test_an_elastic_up_goes_on_without_a_worker_killed_mid_training(tmp_path):
    output, _, metrics = elastic_up_losing_a_worker(tmp_path)
    assert "exited with status -9; the others go on" in output
    assert "generation 1: 2 workers (was 3)" in output
    assert metrics["world_size"] == 2 and metrics["final_test_accuracy"] >= 0.95, metrics["epochs"]


@pytest.mark.slow
def test_an_elastic_up_starts_a_killed_worker_again_and_it_rejoins(tmp_path):
    # Steps that sleep leave the restarted process the CPU to start (tens of seconds on 2 busy cores
    # otherwise) and the job time to still be training when it arrives.
    output, _, metrics = elastic_up_losing_a_worker(tmp_path, "--max-restarts", "1", "--slow-ms", "40", epochs=10)
    assert "exited with status -9; starting it again (restart 1 of 1)" in output
    # Where it comes back in depends on timing: in the survivors' regroup, or at the next epoch boundary.
    changes = [line for line in output.splitlines() if re.search(r"generation \d+: 3 workers \(was [23]\)", line)]
    assert changes and "joined: none" not in changes[-1], output[-3000:]
    assert metrics["world_size"] == 3 and metrics["final_test_accuracy"] >= 0.95, output[-3000:]


@pytest.mark.slow
def test_an_elastic_up_restarts_an_mpi_group_that_lost_a_rank_and_it_rejoins(tmp_path):
    # An MPI group cannot shrink: it leaves the job whole, the TCP group goes on, and the group started again
    # comes back as a whole (at the next epoch boundary, or in the survivors' regroup if it is quick).
    output, _, metrics = elastic_up_losing_a_worker(
        tmp_path, "--max-restarts", "1", "--slow-ms", "40", epochs=10, groups="mpi:2,tcp:2", backend="mpi"
    )
    assert "group0-mpi exited with status" in output and "starting it again (restart 1 of 1)" in output
    changes = [line for line in output.splitlines() if re.search(r"generation \d+: \d+ workers \(was \d+\)", line)]
    assert changes and "4 workers" in changes[-1] and "joined: none" not in changes[-1], output[-3000:]
    assert metrics["world_size"] == 4 and metrics["final_test_accuracy"] >= 0.95, output[-3000:]


def test_up_refuses_restarts_without_elastic_at_once(tmp_path):
    result, _ = up(tmp_path, "--max-restarts", "2", timeout=30)
    assert result.returncode == 1 and "--max-restarts needs --elastic" in result.stderr


def test_up_rejects_unequal_groups_at_once(tmp_path):
    result, _ = up(tmp_path, "--groups", "mpi:2,tcp:3", timeout=30)
    assert result.returncode == 1 and "all groups need the same size" in result.stderr


def start_workers(
    servers: dict, run_id: str, tcp_workers: int, tcp_group_size: int, *extra: str
) -> list[subprocess.Popen]:
    """Group 0: two ranks under mpiexec. Group 1: `tcp_workers` TCP processes."""
    common = [
        "--ps",
        servers["ps"],
        "--barrier",
        servers["barrier"],
        "--lock",
        servers["lock"],
        "--run-id",
        run_id,
        "--num-groups",
        "2",
        "--timeout",
        "60",
        "--join-window",
        "2",
        *extra,
    ]
    assert MPIEXEC, "mpiexec comes with the mpich wheel"
    mpi = subprocess.Popen(
        [
            MPIEXEC,
            "-n",
            "2",
            *nanodist_command("worker", "--backend", "mpi", "--group-id", "0", "--group-size", "2", *common),
        ]
    )
    tcp = [
        subprocess.Popen(
            nanodist_command(
                "worker", "--backend", "tcp", "--group-id", "1", "--group-size", str(tcp_group_size), *common
            )
        )
        for _ in range(tcp_workers)
    ]
    return [mpi, *tcp]


LAYOUTS = {  # name: (TCP workers, their --group-size, flat, pushers the servers wait for)
    "hierarchical": (2, 2, False, 2),
    "flat": (2, 2, True, 4),
    "unequal-groups-elastic": (3, 0, False, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_synchronous_training_equals_single_process_training_on_the_combined_batch(start_server, tmp_path, layout):
    tcp_workers, tcp_group_size, flat, pushers = LAYOUTS[layout]
    world = 2 + tcp_workers
    steps, lr, batch, seed = 6, 0.3, 16, 5
    shards = [start_server("ps", "--mode", "bsp", "--num-workers", str(pushers)) for _ in range(2)]
    servers = {
        "ps": ",".join(s.address for s in shards),
        "barrier": start_server("barrier").address,
        "lock": start_server("lock").address,
    }
    dump = tmp_path / "params.npz"
    run_id = f"eq-{uuid.uuid4().hex[:8]}"
    extra = [
        "--runs-dir",
        str(tmp_path),
        "--max-steps",
        str(steps),
        "--epochs",
        "1",
        "--lr",
        str(lr),
        "--batch-size",
        str(batch),
        "--seed",
        str(seed),
        "--dump-params",
        str(dump),
    ] + (["--flat"] if flat else [])
    procs = start_workers(servers, run_id, tcp_workers, tcp_group_size, *extra)
    assert [p.wait(timeout=180) for p in procs] == [0] * len(procs)
    assert json.loads((tmp_path / run_id / "metrics.json").read_text())["world_size"] == world

    assert_matches_single_process(dump, (64, 64, 10), shards=world, steps=steps, lr=lr, batch=batch, seed=seed)


@pytest.mark.slow
def test_ssp_fast_workers_never_run_more_than_s_steps_ahead_of_a_slow_one(start_server, tmp_path):
    staleness = 2
    ps = start_server("ps", "--mode", "ssp", "--num-workers", "3", "--staleness", str(staleness))
    barrier, lock = start_server("barrier"), start_server("lock")
    run_id = f"ssp-{uuid.uuid4().hex[:8]}"
    common = [
        "--ps",
        ps.address,
        "--barrier",
        barrier.address,
        "--lock",
        lock.address,
        "--run-id",
        run_id,
        "--runs-dir",
        str(tmp_path),
        "--num-groups",
        "3",
        "--group-size",
        "1",
        "--mode",
        "ssp",
        "--staleness",
        str(staleness),
        "--epochs",
        "1",
        "--max-steps",
        "30",
    ]
    procs = [
        subprocess.Popen(
            nanodist_command("worker", "--group-id", str(g), *common, *(["--slow-ms", "40"] if g == 2 else []))
        )
        for g in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 3
    clocks = json.loads((tmp_path / run_id / "metrics.json").read_text())["clocks"]
    leads = {worker: [own - slowest for own, slowest in records] for worker, records in clocks.items()}
    assert max(max(v) for v in leads.values()) <= staleness, leads
    assert max(leads["0"]) == staleness, "the fast workers should have run ahead up to the bound"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ps", "127.0.0.1:1", "--timeout", "3"], "127.0.0.1:1 unreachable"),
        (["--backend", "carrier-pigeon"], "--backend 'carrier-pigeon' is unknown"),
        (["--batch-size", "5000"], "batch size 5000 exceeds the shard"),
        (["--group-id", "3", "--num-groups", "2"], "--group-id 3 is outside [0, 2)"),
        (["--pipeline-stages", "3", "--group-size", "3"], "--pipeline-stages 3 needs at least that many layers"),
        (["--pipeline-stages", "2", "--group-size", "1", "--hidden", "32,32"], "needs --group-size K"),
        (
            ["--pipeline-stages", "2", "--group-size", "2", "--hidden", "32,32", "--micro-batches", "3"],
            "--batch-size 16 must split into --micro-batches 3",
        ),
    ],
)
def test_bad_worker_configuration_fails_fast_and_clearly(start_server, args, message):
    lock = start_server("lock")
    begin = time.monotonic()
    result = subprocess.run(
        nanodist_command("worker", "--run-id", "bad", "--lock", lock.address, "--barrier", lock.address, *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert time.monotonic() - begin < 20


def test_group_size_mismatch_under_mpiexec_is_reported():
    assert MPIEXEC
    result = subprocess.run(
        [MPIEXEC, "-n", "3", *nanodist_command("worker", "--run-id", "bad", "--backend", "mpi", "--group-size", "2")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "group-size mismatch: --group-size 2 but the mpi group has 3 ranks" in result.stderr


def test_status_shows_every_service_and_fails_when_one_is_down(start_server):
    ps, barrier, lock = start_server("ps"), start_server("barrier"), start_server("lock")
    from nanodist.client import LockClient, ParameterServerClient

    with ParameterServerClient([ps.address]) as client:
        client.init({"w": np.zeros(256, np.float32)})
    held = LockClient(lock.address, "alice").acquire("eval", ttl=30)
    args = ["status", "--ps", ps.address, "--barrier", barrier.address, "--lock", lock.address]
    result = subprocess.run(nanodist_command(*args), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"{ps.address}  SERVING  mode asp  workers 1  keys 1  1.0 KB" in result.stdout
    assert "durability none" in result.stdout
    assert f"barrier {barrier.address}  SERVING" in result.stdout
    assert f"eval  holders ['alice (token {held.fencing_token}" in result.stdout
    lock.stop()
    result = subprocess.run(nanodist_command(*args), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"lock {lock.address}  UNAVAILABLE" in result.stdout
