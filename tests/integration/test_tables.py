"""Embedding tables on real shards: lazy rows, row-wise optimizers, limits and kill -9 under WAL."""

import json
import os
import signal

import numpy as np
import pytest

from nanodist.client import (
    DeadlineExceeded,
    InvalidArgument,
    ParameterServerClient,
    ResourceExhausted,
    SparseGradient,
    adagrad,
    sgd,
)
from nanodist.row_init import UNIFORM, initial_rows
from nanodist.v1 import parameter_server_pb2 as ps
from tests.integration.test_lock import wait_until

ROWS, DIM = 1000, 4
UNIFORM_01 = ps.RowInitializer(kind=UNIFORM, scale=0.1, seed=7)


def expected_initial(ids):
    return initial_rows(np.asarray(ids), DIM, kind=UNIFORM, scale=0.1, seed=7)


def shards(start_server, count=2, *args):
    return [start_server("ps", *args).address for _ in range(count)]


def test_rows_start_from_the_documented_initializer_and_exist_only_once_pushed(start_server):
    addresses = shards(start_server)
    with ParameterServerClient(addresses) as client:
        assert client.init_table("emb", ROWS, DIM, initializer=UNIFORM_01, optimizer=sgd(0.5))
        assert not client.init_table("emb", ROWS, DIM, initializer=UNIFORM_01)  # first writer wins
        ids = np.array([999, 0, 3, 500, 3])  # both shards, a repeat, in any order
        pulled = client.pull_rows({"emb": ids})
        np.testing.assert_array_equal(pulled["emb"], expected_initial(ids))
        assert sum(k.rows_held for k in client.list_keys()) == 0  # reading creates nothing
        client.push_rows({"emb": SparseGradient(np.array([3, 999, 3]), np.ones((3, DIM), np.float32))})
        after = client.pull_rows({"emb": np.array([3, 999, 4])})["emb"]
    want = expected_initial([3, 999, 4])
    want[0] -= 0.5 * 2  # row 3 was pushed twice in one batch: its gradients add up
    want[1] -= 0.5
    np.testing.assert_allclose(after, want, rtol=1e-6)
    infos = {k.key: k for k in ParameterServerClient(addresses).list_keys()}
    assert infos["emb:part0of2"].rows_held == 1 and infos["emb:part1of2"].rows_held == 1
    assert list(infos["emb:part0of2"].shape) == [500, DIM] and infos["emb:part1of2"].table.first_row == 500


def test_bsp_averages_the_workers_rows_and_adagrad_keeps_untouched_rows_state(start_server):
    addresses = shards(start_server, 2, "--mode", "bsp", "--num-workers", "2")
    lr, eps = 0.1, 1e-10
    clients = [ParameterServerClient(addresses, worker_id=w) for w in range(2)]
    clients[0].init_table("emb", ROWS, DIM, initializer=UNIFORM_01, optimizer=adagrad(lr, eps))
    reference = expected_initial(np.arange(ROWS)).astype(np.float64)
    accumulator = np.zeros_like(reference)
    rng = np.random.default_rng(0)
    for step in range(3):
        grads = []
        for client in clients:
            rows = rng.integers(0, ROWS, 20)
            values = rng.standard_normal((20, DIM)).astype(np.float32)
            grads.append((rows, values))
            client.push_rows({"emb": SparseGradient(rows, values)}, step=step)
        mean = np.zeros_like(reference)
        for rows, values in grads:
            np.add.at(mean, rows, values / 2)
        touched = np.unique(np.concatenate([rows for rows, _ in grads]))
        accumulator[touched] += mean[touched] ** 2
        reference[touched] -= lr * mean[touched] / (np.sqrt(accumulator[touched]) + eps)
        pulled = clients[1].pull_rows({"emb": np.arange(ROWS)}, min_version=step + 1)
        assert pulled.versions["emb"] == step + 1
        np.testing.assert_allclose(pulled["emb"], reference, rtol=1e-4, atol=1e-6)
    for client in clients:
        client.close()


def test_bad_ids_are_refused_before_sending_and_by_the_server(start_server):
    (address,) = shards(start_server, 1)
    with ParameterServerClient([address]) as client:
        client.init_table("emb", ROWS, DIM)
        with pytest.raises(ValueError, match=r"table 'emb': id 1000 is out of range \[0, 1000\)"):
            client.pull_rows({"emb": np.array([1, 1000])})
        with pytest.raises(ValueError, match="table 'emb': id -1"):
            client.push_rows({"emb": SparseGradient(np.array([-1]), np.ones((1, DIM), np.float32))})
        with pytest.raises(InvalidArgument, match="pull it by rows"):
            client.pull(["emb:part0of1"])
        with pytest.raises(InvalidArgument, match="push sparse rows"):
            client.push({"emb:part0of1": np.ones((ROWS, DIM), np.float32)})
        stub = ParameterServerClient([address])
        with pytest.raises(InvalidArgument, match=r"indices must be in \[0, 1000\)"):
            stub.pull(["emb:part0of1"], rows={"emb:part0of1": np.array([1000])})


def test_max_bytes_refusal_names_the_table_and_keeps_what_was_there(start_server):
    (address,) = shards(start_server, 1, "--max-bytes", str(100 * DIM * 4 * 2))  # 100 rows with Adagrad state
    with ParameterServerClient([address]) as client:
        client.init_table("clicks", 10**8, DIM, optimizer=adagrad(0.1))  # a 100M-row table costs nothing yet
        client.push_rows({"clicks": SparseGradient(np.arange(60), np.ones((60, DIM), np.float32))})
        with pytest.raises(ResourceExhausted, match=r"table 'clicks:part0of1': 60 new rows .*\(--max-bytes\)"):
            client.push_rows({"clicks": SparseGradient(np.arange(30, 120), np.ones((90, DIM), np.float32))})
        assert client.list_keys()[0].rows_held == 60
        assert client.stats()[0].total_bytes == 60 * DIM * 4


def test_a_table_survives_kill_9_under_wal_and_checkpoints_hold_only_its_rows(start_server, tmp_path):
    state = tmp_path / "state"
    args = ("--durability", "wal", "--checkpoint-dir", str(state), "--checkpoint-every", "3")
    server = start_server("ps", *args)
    ids = np.array([5, 70_000_000, 123_456_789])
    with ParameterServerClient([server.address]) as client:
        client.init_table("big", 200_000_000, DIM, initializer=UNIFORM_01, optimizer=adagrad(0.1))
        for step in range(5):  # checkpoints after pushes 3, the rest in the log only
            client.push_rows({"big": SparseGradient(ids + step, np.ones((3, DIM), np.float32))}, step=step)
        wanted = np.concatenate([ids + s for s in range(6)])
        before = client.pull_rows({"big": wanted})["big"].copy()
    # The checkpoint after push 3 is written in the background: the kill comes once it is on disk.
    wait_until(lambda: any(state.glob("ckpt-*")), timeout=30)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    restarted = start_server("ps", *args, port=server.port)
    with ParameterServerClient([restarted.address]) as client:
        np.testing.assert_array_equal(client.pull_rows({"big": wanted})["big"], before)
        assert client.list_keys()[0].rows_held == 15
    checkpoints = sorted(p for p in os.listdir(state) if p.startswith("ckpt-"))
    manifest = json.loads((state / checkpoints[-1] / "manifest.json").read_text())
    (meta,) = manifest["keys"].values()
    assert meta["shape"] == [9, DIM] and meta["table"]["rows"] == 200_000_000  # 3 pushes x 3 rows, not 200M


def test_asp_applies_each_workers_rows_at_once_and_ssp_pulls_wait_for_the_slowest(start_server):
    one = np.ones((1, DIM), np.float32)
    (asp,) = shards(start_server, 1, "--mode", "asp")
    with ParameterServerClient([asp], worker_id=0) as first, ParameterServerClient([asp], worker_id=1) as second:
        first.init_table("emb", ROWS, DIM, initializer=UNIFORM_01, optimizer=sgd(0.5))
        first.push_rows({"emb": SparseGradient(np.array([1]), one)})
        seen = second.pull_rows({"emb": np.array([1])})
        assert seen.versions["emb"] == 1  # applied alone, not averaged with anyone's
        np.testing.assert_allclose(seen["emb"], expected_initial([1]) - 0.5, rtol=1e-6)
        second.push_rows({"emb": SparseGradient(np.array([1]), one)})
        np.testing.assert_allclose(
            first.pull_rows({"emb": np.array([1])})["emb"], expected_initial([1]) - 1.0, rtol=1e-6
        )
    (ssp,) = shards(start_server, 1, "--mode", "ssp", "--num-workers", "2", "--staleness", "1")
    with ParameterServerClient([ssp], worker_id=0) as fast, ParameterServerClient([ssp], worker_id=1) as slow:
        fast.init_table("emb", ROWS, DIM, optimizer=sgd(0.5))
        for step in range(3):
            fast.push_rows({"emb": SparseGradient(np.array([step]), one)}, step=step)
        with pytest.raises(DeadlineExceeded, match="slowest worker clock 0"):
            fast.pull_rows({"emb": np.array([0])}, clock=3, timeout_ms=300)  # 3 steps ahead of a clock of 0
        slow.push_rows({"emb": SparseGradient(np.array([9]), one)}, step=0)
        slow.push_rows({"emb": SparseGradient(np.array([9]), one)}, step=1)
        assert fast.pull_rows({"emb": np.array([0])}, clock=3, timeout_ms=5000).slowest_clock == 2
