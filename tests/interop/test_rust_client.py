"""A Rust client, generated from protos/ alone (tonic + prost), against live nanodist servers."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from nanodist.client import KVStore, LockClient, ParameterServerClient, adam, sgd, shard_of
from tests.conftest import ROOT

CRATE = os.path.join(ROOT, "tests", "interop", "rust")
# Kept outside the clone so that later runs on the same machine reuse the compiled dependencies.
TARGET = os.environ.get("NANODIST_INTEROP_TARGET", os.path.expanduser("~/.cache/nanodist/interop-target"))


@pytest.fixture(scope="module")
def rust_client() -> str:
    cargo = shutil.which("cargo")
    assert cargo, "cargo (the Rust toolchain) is needed to build the interop client"
    began = time.monotonic()
    subprocess.run(
        [cargo, "build", "--quiet", "--manifest-path", os.path.join(CRATE, "Cargo.toml")],
        env={**os.environ, "CARGO_TARGET_DIR": TARGET},
        check=True,
        timeout=1200,
    )
    print(f"\nRust interop client built in {time.monotonic() - began:.1f} s")
    return os.path.join(TARGET, "debug", "nanodist-interop")


def expected_bytes(address: str) -> dict[str, bytes]:
    """What the Python client gets for the same inits and pushes, on a server of its own."""
    with ParameterServerClient([address]) as client:
        client.init({"interop/f32": np.array([1, 2, 3, 4], np.float32)}, sgd(0.5))
        client.init({"interop/f64": np.array([1, 2, 3], np.float64)}, adam(0.1))
        for _ in range(2):
            client.push(
                {
                    "interop/f32": np.array([0.5, 0.25, -1, 2], np.float32),
                    "interop/f64": np.array([0.1, -0.2, 0.3], np.float64),
                }
            )
        values = client.pull(["interop/f32", "interop/f64"])
    return {k: v.tobytes() for k, v in values.items()}


def test_rust_client_runs_the_scenario_against_live_servers(start_server, rust_client):
    ps, reference = start_server("ps"), start_server("ps")
    barrier, lock = start_server("barrier"), start_server("lock")
    join = (
        "import sys; from nanodist.client import BarrierClient; "
        "print(BarrierClient(sys.argv[1], sys.argv[2]).wait('interop', 3, timeout=60).generation)"
    )
    python_members = [
        subprocess.Popen(
            [sys.executable, "-c", join, barrier.address, f"python-{i}"], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]

    result = subprocess.run(
        [rust_client, ps.address, barrier.address, lock.address], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split(" ", 2) for line in result.stdout.splitlines()]
    out: dict[str, list[list[str]]] = {}
    for name, *rest in lines:
        out.setdefault(name, []).append(rest)

    # the documented key -> shard hash agrees with Python's
    for key, shard in out["shard"]:
        assert int(shard) == shard_of(key, 2), key
    assert out["init"] == [["2"]]
    assert out["push"][-1] == ["1", "versions [2, 2]"]
    # values pulled by Rust are the bytes the Python client computes for the same pushes
    expected = expected_bytes(reference.address)
    for key, rest in out["pull"]:
        version, data = rest.split()
        assert version == "2" and bytes.fromhex(data) == expected[key], key
    # a malformed tensor gets INVALID_ARGUMENT with a readable message
    code, message = out["bad"][0]
    assert code == "InvalidArgument" and "entries[0].dense.data: 15 bytes" in message
    # the next holder of the lock gets a larger fencing token
    rust_token = int(out["lock"][0][0])
    with LockClient(lock.address, "python") as locks:
        assert locks.acquire("interop-lock").fencing_token > rust_token
    with KVStore(lock.address) as store:
        assert int(out["add"][0][0]) == 5 and store.add("interop-counter", 0) == 5
    # the barrier released all three: the two Python processes and the Rust client
    assert [m.communicate(timeout=30)[0].strip() for m in python_members] == ["0", "0"]
    assert out["barrier"][0][0] == "0"
