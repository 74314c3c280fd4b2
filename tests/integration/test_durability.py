"""kill -9 of a parameter server in wal mode: acknowledged pushes survive, retries stay exactly-once."""

import json
import signal
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest

from nanodist.client import ParameterServerClient, Unavailable, sgd
from nanodist.client.retry import NO_RETRY
from tests.conftest import nanodist_command
from tests.integration.test_lock import wait_until

SIZE = 65536  # 256 KiB per push: large enough that pushes share fsyncs
CLIENTS = 4


def wal_server(start_server, tmp_path, port=None, *extra):
    return start_server(
        "ps",
        "--durability",
        "wal",
        "--checkpoint-dir",
        str(tmp_path / "state"),
        "--checkpoint-every",
        "40",  # checkpoints, and log rotations, happen while pushes are in flight
        *extra,
        port=port,
    )


def test_every_acknowledged_push_survives_kill_9_and_a_retried_request_id_applies_once(start_server, tmp_path):
    server = wal_server(start_server, tmp_path)
    keys = [f"w{i}" for i in range(CLIENTS)]
    with ParameterServerClient([server.address]) as client:
        client.init({k: np.zeros(SIZE, np.float32) for k in keys}, sgd(1.0))
    acked = dict.fromkeys(keys, 0)
    in_flight: dict[str, str] = {}
    started = threading.Barrier(CLIENTS + 1)

    def pusher(key: str) -> None:
        with ParameterServerClient([server.address], retry=NO_RETRY) as client:
            started.wait()
            while True:
                in_flight[key] = uuid.uuid4().hex
                try:
                    client.push({key: np.full(SIZE, -1.0, np.float32)}, request_id=in_flight[key])
                except Unavailable:
                    return
                acked[key] += 1  # each applied push adds exactly 1 to every element

    threads = [threading.Thread(target=pusher, args=(k,)) for k in keys]
    for thread in threads:
        thread.start()
    started.wait()
    with ParameterServerClient([server.address]) as watcher:
        while sum(s.pushes_applied for s in watcher.stats()) < 150:
            pass
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    for thread in threads:
        thread.join(timeout=30)
    at_kill = dict(acked)
    assert min(at_kill.values()) > 10

    restarted = wal_server(start_server, tmp_path, server.port)
    with ParameterServerClient([restarted.address]) as client:
        restored = client.pull(keys)
        for key in keys:
            value = restored[key]
            assert np.all(value == value[0]), f"{key}: a push was applied partially"
            # Every acknowledged push is there; the one in flight at the kill may or may not be.
            assert at_kill[key] <= value[0] <= at_kill[key] + 1, (key, value[0], at_kill[key])
            # Retrying the in-flight push with its request_id applies it exactly once.
            client.push({key: np.full(SIZE, -1.0, np.float32)}, request_id=in_flight[key])
            client.push({key: np.full(SIZE, -1.0, np.float32)}, request_id=in_flight[key])
        after = client.pull(keys)
    for key in keys:
        assert after[key][0] == at_kill[key] + 1, (key, after[key][0], at_kill[key])
    log = (tmp_path / f"ps-{server.port}.log").read_text()
    assert "replayed" in log and "write-ahead-log records" in log


def test_bsp_pushes_waiting_for_their_step_survive_kill_9(start_server, tmp_path):
    server = wal_server(start_server, tmp_path, None, "--mode", "bsp", "--num-workers", "2")
    with ParameterServerClient([server.address], worker_id=0) as first:
        first.init({"w": np.zeros(4, np.float32)}, sgd(1.0))
        first.push({"w": np.full(4, -2.0, np.float32)}, step=0)  # acknowledged, waiting for worker 1
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    restarted = wal_server(start_server, tmp_path, server.port, "--mode", "bsp", "--num-workers", "2")
    with ParameterServerClient([restarted.address], worker_id=1) as second:
        second.push({"w": np.full(4, -4.0, np.float32)}, step=0)
        pulled = second.pull(["w"], min_version=1)
    assert pulled["w"].tolist() == [3.0] * 4 and pulled.versions == {"w": 1}  # the mean of both pushes


def test_checkpoint_mode_loses_what_came_after_the_last_checkpoint(start_server, tmp_path):
    """The documented cost of checkpoint-only durability, so that nobody mistakes it for wal."""
    args = ("--durability", "checkpoint", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2")
    server = start_server("ps", *args)
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(1, np.float32)}, sgd(1.0))
        for _ in range(2):
            client.push({"w": np.full(1, -1.0, np.float32)})
        while not list((tmp_path / "ckpt").glob("ckpt-*")):  # written in the background after push 2
            time.sleep(0.01)
        client.push({"w": np.full(1, -1.0, np.float32)})
        assert client.pull(["w"])["w"][0] == 3.0
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    restarted = start_server("ps", *args, port=server.port)
    with ParameterServerClient([restarted.address]) as client:
        assert client.pull(["w"])["w"][0] == 2.0


@pytest.mark.slow
def test_training_rides_through_a_parameter_server_kill_9_and_restart(start_server, tmp_path):
    args = ("--mode", "bsp", "--num-workers", "1", "--durability", "wal")
    shards = [start_server("ps", *args, "--checkpoint-dir", str(tmp_path / f"ps{i}")) for i in range(2)]
    services = {"barrier": start_server("barrier").address, "lock": start_server("lock").address}
    run_id = f"ride-{uuid.uuid4().hex[:8]}"
    workers = [
        subprocess.Popen(
            nanodist_command(
                "worker",
                "--backend",
                "tcp",
                "--group-size",
                "2",
                "--ps",
                ",".join(s.address for s in shards),
                "--barrier",
                services["barrier"],
                "--lock",
                services["lock"],
                "--run-id",
                run_id,
                "--runs-dir",
                str(tmp_path),
                "--epochs",
                "8",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    with ParameterServerClient([shards[0].address]) as watcher:
        while not watcher.stats()[0].pushes_applied >= 100:
            pass
    shards[0].process.send_signal(signal.SIGKILL)
    shards[0].process.wait()
    start_server("ps", *args, "--checkpoint-dir", str(tmp_path / "ps0"), port=shards[0].port)
    for worker in workers:
        _, stderr = worker.communicate(timeout=240)
        assert worker.returncode == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95 and len(metrics["epochs"]) == 8


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_wal_checkpoint_falls_back_to_the_previous_one_and_replays_the_log(start_server, tmp_path, damage):
    server = wal_server(start_server, tmp_path, None)
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(8, np.float32)}, sgd(1.0))
        for _ in range(100):  # checkpoints after push 40 and 80
            client.push({"w": np.full(8, -1.0, np.float32)})
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    newest = sorted((tmp_path / "state").glob("ckpt-*"))[-1] / "k0.value.npy"
    data = newest.read_bytes()
    newest.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]) if damage == "flip" else data[: len(data) // 2])
    restarted = wal_server(start_server, tmp_path, server.port)
    with ParameterServerClient([restarted.address]) as client:
        assert client.pull(["w"])["w"].tolist() == [100.0] * 8
    assert "is damaged" in (tmp_path / f"ps-{server.port}.log").read_text()


def test_a_damaged_sole_checkpoint_is_rebuilt_from_the_whole_log(start_server, tmp_path):
    server = wal_server(start_server, tmp_path, None)
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(8, np.float32)}, sgd(1.0))
        for _ in range(50):  # one checkpoint, after push 40
            client.push({"w": np.full(8, -1.0, np.float32)})
    wait_until(lambda: len(list((tmp_path / "state").glob("ckpt-*"))) == 1)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    (only,) = (tmp_path / "state").glob("ckpt-*")
    (only / "k0.value.npy").write_bytes(b"")
    restarted = wal_server(start_server, tmp_path, server.port)
    with ParameterServerClient([restarted.address]) as client:
        assert client.pull(["w"])["w"].tolist() == [50.0] * 8  # the init and every push, from the log
    assert "is damaged" in (tmp_path / f"ps-{server.port}.log").read_text()


def test_a_checkpoint_keeps_a_bsp_step_in_progress_and_the_dedup_window(start_server, tmp_path):
    args = ("--mode", "bsp", "--num-workers", "2", "--checkpoint-dir", str(tmp_path / "ckpt"))
    server = start_server("ps", *args)
    with ParameterServerClient([server.address], worker_id=0) as first:
        first.init({"w": np.zeros(4, np.float32)}, sgd(1.0))
        first.push({"w": np.full(4, -2.0, np.float32)}, step=0, request_id="first-push")
    assert server.stop() == 0  # SIGTERM: the final checkpoint
    restarted = start_server("ps", *args, port=server.port)
    with ParameterServerClient([restarted.address], worker_id=0) as first:
        first.push({"w": np.full(4, -2.0, np.float32)}, step=0, request_id="first-push")  # a retry: no effect
    with ParameterServerClient([restarted.address], worker_id=1) as second:
        second.push({"w": np.full(4, -4.0, np.float32)}, step=0)
        pulled = second.pull(["w"], min_version=1)
    assert pulled["w"].tolist() == [3.0] * 4 and pulled.versions == {"w": 1}


def test_durability_none_with_a_directory_is_refused(tmp_path):
    result = subprocess.run(
        nanodist_command("serve", "ps", "--durability", "none", "--checkpoint-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0 and "--durability none keeps nothing" in result.stderr


def test_the_log_is_checkpointed_away_when_it_grows_past_its_limit(start_server, tmp_path):
    state = tmp_path / "state"
    server = start_server(
        "ps", "--durability", "wal", "--checkpoint-dir", str(state), "--max-log-bytes", str(300 << 10)
    )
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(SIZE, np.float32)}, sgd(1.0))
        for _ in range(40):  # 10 MiB of log in 256 KiB pushes
            client.push({"w": np.full(SIZE, -1.0, np.float32)})
        (stats,) = client.stats()
    assert stats.durability == "wal" and stats.wal_records == 41  # the Init and 40 pushes
    assert 1 <= stats.wal_fsyncs <= 41
    # Checkpoints are written by a thread while pushes go on: under load the last may still be writing.
    deadline = time.monotonic() + 60
    while (log_bytes := sum(f.stat().st_size for f in (state / "wal").iterdir())) >= 2 << 20:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    assert log_bytes < 2 << 20, f"{log_bytes} bytes of log are left; checkpoints should have pruned it"
    restarted = wal_server(start_server, tmp_path, server.port)
    with ParameterServerClient([restarted.address]) as client:
        assert client.pull(["w"])["w"][0] == 40.0
    assert "checkpoint (log size)" in (tmp_path / f"ps-{server.port}.log").read_text()
