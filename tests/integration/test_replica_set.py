"""Replicated parameter-server shards (`nanodist serve ps --replica-set`): a primary and a backup per
shard, elected on the lock service. Workers push integer gradients under SGD at learning rate 1, so
each key ends at minus the sum of the pushes applied to it: every acknowledged push must be in it,
exactly once, whichever replica died or froze on the way."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest

from nanodist.client import NanodistError, ParameterServerClient, Unavailable, sgd
from nanodist.client.retry import NO_RETRY
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.v1 import parameter_server_pb2_grpc
from tests.conftest import nanodist_command
from tests.integration.test_lock import wait_until

KEYS = [f"w{i}" for i in range(4)]
TTL = "2"


def replica(start_server, lock, name: str, port: int | None = None):
    return start_server("ps", "--replica-set", name, "--coordinator", lock.address, "--replica-ttl", TTL, port=port)


def status(server) -> ps.ReplicaSetStatus | None:
    """The replica set as `server` sees it; None if it does not answer."""
    try:
        with grpc.insecure_channel(server.address) as channel:
            stats = parameter_server_pb2_grpc.ParameterServerStub(channel).Stats(ps.StatsRequest(), timeout=5)
    except grpc.RpcError:
        return None
    return stats.replicas


def primary_with_backup_in_sync(replicas: list) -> object | None:
    """The replica that is primary with every other one in sync behind it, if any."""
    for server in replicas:
        seen = status(server)
        if seen is not None and seen.role == "primary":
            in_sync = {f.address for f in seen.followers if f.in_sync}
            if in_sync >= {r.address for r in replicas if r is not server}:
                return server
    return None


def settled(replicas: list, timeout: float = 60) -> object:
    wait_until(lambda: primary_with_backup_in_sync(replicas) is not None, timeout)
    return primary_with_backup_in_sync(replicas)


class Pushers:
    """Threads that push +1s and +2s to every key, each push retried with its request id until it is
    acknowledged; `acked` sums what the shards acknowledged."""

    def __init__(self, addresses: list[str], threads: int = 3) -> None:
        self.addresses = addresses
        self.acked = {k: 0 for k in KEYS}
        self.count = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._push, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _push(self, worker: int) -> None:
        try:
            with ParameterServerClient(self.addresses, worker_id=worker, timeout=10) as client:
                n = 0
                while not self._stop.is_set():
                    n += 1
                    grads = {k: np.full(3, 1 + (n + worker) % 2, np.float32) for k in KEYS}
                    request_id = f"w{worker}-{n}"
                    while True:
                        try:
                            client.push(grads, request_id=request_id)
                            break
                        except NanodistError:
                            time.sleep(0.2)  # a failover under way: the same request id again
                    with self._lock:
                        self.count += 1
                        for k in KEYS:
                            self.acked[k] += int(grads[k][0])
        except BaseException as error:  # noqa: BLE001 - reported by stop()
            self.errors.append(error)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        assert not self.errors, self.errors
        assert not any(t.is_alive() for t in self._threads), "a pusher is stuck"


def check_history(addresses: list[str], pushers: Pushers) -> None:
    with ParameterServerClient(addresses, timeout=30) as client:
        values = client.pull(KEYS)
    for key in KEYS:
        assert values[key].tolist() == [-pushers.acked[key]] * 3, (key, pushers.acked[key])


def two_shards(start_server, lock) -> tuple[list, list[str]]:
    """Two replica sets of 2, settled, with KEYS initialised: shard 0's replicas and both shards' addresses."""
    first = [replica(start_server, lock, "s0") for _ in range(2)]
    second = [replica(start_server, lock, "s1") for _ in range(2)]
    settled(first)
    settled(second)
    addresses = ["+".join(r.address for r in first), "+".join(r.address for r in second)]
    with ParameterServerClient(addresses) as client:
        client.init({k: np.zeros(3, np.float32) for k in KEYS}, sgd(1.0))
    return first, addresses


def test_a_backup_refuses_client_calls_naming_the_primary(start_server):
    lock = start_server("lock")
    replicas = [replica(start_server, lock, "s0") for _ in range(2)]
    primary = settled(replicas)
    backup = next(r for r in replicas if r is not primary)
    with grpc.insecure_channel(backup.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            parameter_server_pb2_grpc.ParameterServerStub(channel).ListKeys(ps.ListKeysRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"the primary is {primary.address}" in refused.value.details()
    with ParameterServerClient(f"{backup.address}+{primary.address}", timeout=10) as client:
        client.init({"w": np.zeros(2, np.float32)}, sgd(1.0))
        client.push({"w": np.ones(2, np.float32)})
        assert client.pull(["w"])["w"].tolist() == [-1, -1]
    with ParameterServerClient(primary.address, lanes="on") as direct:  # no lane: its pushes must reach the backup
        direct.push({"w": np.ones(2, np.float32)})
    with ParameterServerClient(backup.address + "+" + primary.address) as client:
        assert client.pull(["w"])["w"].tolist() == [-2, -2]
    for server in (backup, primary):  # SIGTERM stops a replica, whatever it was waiting for
        assert server.stop() == 0


@pytest.mark.slow
def test_killing_the_primary_twice_under_load_loses_no_acknowledged_push(start_server):
    """kill -9 of shard 0's primary mid-run (a replica set keeps nothing on disk, so its state goes with
    it); the backup takes over, the killed one starts again empty and is rebuilt from a snapshot while
    the pushes go on, then the new primary is killed too and the rebuilt replica takes over."""
    lock = start_server("lock")
    first, addresses = two_shards(start_server, lock)
    pushers = Pushers(addresses)
    for _ in range(2):
        victim = primary_with_backup_in_sync(first)
        wait_until(lambda: pushers.count >= 30, 120)  # noqa: B023
        before = pushers.count
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        wait_until(lambda: pushers.count >= before + 30, 120)  # noqa: B023 - the survivor took over
        first[first.index(victim)] = replica(start_server, lock, "s0", port=victim.port)
        settled(first)  # rebuilt from a snapshot while the pushes go on
    wait_until(lambda: pushers.count >= before + 60, 120)
    pushers.stop()
    check_history(addresses, pushers)


@pytest.mark.slow
def test_a_primary_frozen_past_its_lease_is_replaced_and_acknowledges_nothing_after(start_server):
    lock = start_server("lock")
    first, addresses = two_shards(start_server, lock)
    pushers = Pushers(addresses)
    frozen = primary_with_backup_in_sync(first)
    wait_until(lambda: pushers.count >= 30, 120)
    frozen.process.send_signal(signal.SIGSTOP)
    survivor = next(r for r in first if r is not frozen)
    wait_until(lambda: (status(survivor) or ps.ReplicaSetStatus()).role == "primary", 60)
    before = pushers.count
    wait_until(lambda: pushers.count >= before + 30, 120)
    frozen.process.send_signal(signal.SIGCONT)
    assert frozen.process.wait(timeout=60) == 3  # it found its lease lapsed and stepped down
    pushers.stop()
    check_history(addresses, pushers)


def test_a_backup_that_fell_behind_never_takes_over(start_server, tmp_path):
    """A backup frozen while a push is acknowledged leaves the in-sync set first (the push waits for
    that); when the primary then dies, the woken backup holds less than was acknowledged, so it must
    not serve: the set stays unavailable, and says why, rather than lose the push."""
    lock = start_server("lock")
    replicas = [replica(start_server, lock, "s0") for _ in range(2)]
    primary = settled(replicas)
    backup = next(r for r in replicas if r is not primary)
    with ParameterServerClient(f"{primary.address}+{backup.address}", timeout=30) as client:
        client.init({"w": np.zeros(2, np.float32)}, sgd(1.0))
        client.push({"w": np.ones(2, np.float32)})
        backup.process.send_signal(signal.SIGSTOP)
        client.push({"w": np.ones(2, np.float32)})  # acknowledged once the frozen backup was dropped
    primary.process.send_signal(signal.SIGKILL)
    primary.process.wait()
    backup.process.send_signal(signal.SIGCONT)
    log = tmp_path / f"ps-{backup.port}.log"
    wait_until(lambda: "which is not in sync" in log.read_text(), 60)  # the lock came to it, and it passed
    seen = status(backup)
    assert seen is not None and seen.role != "primary"
    with ParameterServerClient(backup.address, timeout=5, retry=NO_RETRY) as client, pytest.raises(Unavailable):
        client.pull(["w"])


def test_status_shows_each_shard_s_primary_backups_epoch_and_lag(start_server):
    lock, barrier = start_server("lock"), start_server("barrier")
    replicas = [replica(start_server, lock, "s0") for _ in range(2)]
    primary = settled(replicas)
    backup = next(r for r in replicas if r is not primary)
    shard = f"{backup.address}+{primary.address}"
    with ParameterServerClient(shard) as client:
        client.init({"w": np.zeros(2, np.float32)}, sgd(1.0))
        client.push({"w": np.ones(2, np.float32)})
    shown = subprocess.run(
        nanodist_command("status", "--ps", shard, "--barrier", barrier.address, "--lock", lock.address),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    epoch = status(primary).epoch
    assert f"replica set s0: backup of {primary.address}  epoch {epoch}  change 2" in shown.stdout, shown.stdout
    assert f"replica set s0: primary  epoch {epoch}  change 2  backups ['{backup.address} (in sync, 0 behind)']" in (
        shown.stdout
    )


def child_with(parent: int, text: str) -> int:
    """The pid of a child of `parent` whose command line holds `text`."""
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if text.encode() in f.read():
                return int(pid)
    raise AssertionError(f"no child of {parent} runs with {text!r}")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("mode", "accuracy"), [("bsp", 0.95), ("asp", 0.93)])
def test_up_with_replicated_shards_trains_through_kill_9_of_a_primary(tmp_path, mode, accuracy):
    command = nanodist_command(
        "up", "--ps-replicas", "2", "--mode", mode, "--slow-ms", "20",
        "--run-id", "replicated", "--runs-dir", str(tmp_path),
    )  # fmt: skip
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert up.stdout is not None
    output, primary, killed = [], "", False
    for line in up.stdout:
        output.append(line)
        took_over = re.match(r"\[(ps-0-\d)\] .* is primary of replica set 'shard-0'", line)
        if took_over:
            primary = took_over.group(1)
        if not killed and primary and re.search(r"epoch \d+: .*test accuracy", line):  # mid-run
            os.kill(child_with(up.pid, f"{primary}.port"), signal.SIGKILL)
            killed = True
            victim = primary
    logged = "".join(output)
    assert up.wait(timeout=60) == 0, logged[-4000:]
    assert killed, logged[-4000:]
    assert f"{victim} exited with status -9; starting it again" in logged
    assert primary != victim, "the backup took over"
    assert re.search(rf"\[{victim}\] .* follows 127\.0\.0\.1:\d+ from change", logged), "the restarted replica rejoined"
    metrics = json.loads((tmp_path / "replicated" / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= accuracy
