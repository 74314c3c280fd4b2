import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from nanodist.client import KVStore
from nanodist.workers.comm import CommError, ReduceOp, SingleProcess, from_env
from nanodist.workers.comm.rendezvous import via_store
from tests.integration.comm_ranks import FIRST_JOB_RANK

MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
RANKS = [sys.executable, "-m", "tests.integration.comm_ranks"]


def mpiexec(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    assert MPIEXEC, "mpiexec comes with the mpich wheel; run make setup"
    return subprocess.run([MPIEXEC, "-n", str(n), *RANKS, *args], capture_output=True, text=True, timeout=timeout)


def tcp_group(lock_address: str, n: int, *args: str, shm: bool = True) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "NANODIST_LOCK_ADDRESS": lock_address,
        "NANODIST_WORLD_SIZE": str(n),
        "NANODIST_GROUP": uuid.uuid4().hex,
        "NANODIST_COMM_TIMEOUT": "30",
        "NANODIST_COMM_SHM": str(int(shm)),
    }

    env.pop("NANODIST_RANK", None)
    return [
        subprocess.Popen([*RANKS, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_collectives_match_numpy(n):
    result = mpiexec(n, "all", "mpi")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok (MPICommunicator") == n


def test_mpi_dtype_mismatch_is_reported():
    result = mpiexec(2, "mismatch", "mpi", timeout=60)
    assert result.returncode != 0
    assert "disagree on allreduce" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("n", "shm"), [(2, True), (3, True), (4, True), (3, False)])
def test_tcp_collectives_match_numpy_after_rendezvous_through_the_lock_service(start_server, n, shm):
    lock = start_server("lock")
    procs = tcp_group(lock.address, n, "all", "tcp", shm=shm)
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outputs
    ranks = sorted(out.split()[1] for out, _ in outputs)
    assert ranks == [str(r) for r in range(n)], "ranks come from the counter, each exactly once"
    assert all(f"shared memory {'on' if shm else 'off'}" in out for out, _ in outputs), outputs


def test_tcp_peer_killed_mid_allreduce_is_named_by_every_survivor(start_server):
    lock = start_server("lock")
    procs = tcp_group(lock.address, 3, "loop", "tcp")
    ranks = [int(p.stdout.readline().split()[1]) for p in procs]  # "looping RANK", ranks from the counter
    victim, victim_rank = procs[1], ranks[1]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait()
    survivors = [procs[0], procs[2]]
    outputs = [p.communicate(timeout=30)[0] for p in survivors]
    assert time.monotonic() - killed_at < 30
    assert [p.returncode for p in survivors] == [3, 3], outputs
    survivor_names = {f"rank {FIRST_JOB_RANK + r}:" for r in (ranks[0], ranks[2])}
    for out in outputs:  # named as the job numbers them (a survivor may pass on the other's account)
        assert f"lost the connection to rank {FIRST_JOB_RANK + victim_rank} " in out, out
        assert any(name in out for name in survivor_names), out


def test_tcp_dtype_mismatch_is_detected_on_both_ranks():
    from tests.conftest import free_port

    peers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [*RANKS, "mismatch", "tcp"],
            env={**os.environ, "NANODIST_PEERS": peers, "NANODIST_RANK": str(r)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3]
    for out in outputs:
        assert "dtype float" in out and "disagree on allreduce" in out, out


def test_rendezvous_names_the_ranks_that_never_joined(start_server):
    lock = start_server("lock")
    begin = time.monotonic()
    with KVStore(lock.address) as store, pytest.raises(CommError, match=r"ranks \[1, 2\] did not join within 1s"):
        via_store(store, uuid.uuid4().hex, 3, timeout=1)
    assert time.monotonic() - begin < 5


def test_a_full_group_refuses_another_rank(start_server):
    lock = start_server("lock")
    group = uuid.uuid4().hex
    with KVStore(lock.address) as store:
        store.add(f"{group}/next-rank", 2)
        with pytest.raises(CommError, match="already has its 2 ranks"):
            via_store(store, group, 2, timeout=1)


def test_single_process_collectives_are_identity():
    comm = from_env("single")
    assert isinstance(comm, SingleProcess) and (comm.rank, comm.size) == (0, 1)
    array = np.arange(4.0)
    assert comm.allreduce(array, ReduceOp.MEAN) is array and array.tolist() == [0, 1, 2, 3]
    assert comm.allgather(array).shape == (1, 4)
    with pytest.raises(ValueError, match="MEAN needs a floating-point"):
        comm.allreduce(np.arange(3), ReduceOp.MEAN)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(CommError, match="unknown backend 'carrier-pigeon'"):
        from_env("carrier-pigeon")


@pytest.mark.parametrize("backend", ["tcp", "mpi"])
def test_comm_check_cli_verifies_and_prints_bandwidth(backend):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanodist.workers.cli",
            "comm-check",
            "--backend",
            backend,
            "--nprocs",
            "2",
            "--size-mb",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "2 ranks: allgather, allreduce and broadcast match numpy" in result.stdout
    assert "GB/s" in result.stdout
