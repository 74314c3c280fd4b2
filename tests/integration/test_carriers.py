"""The parameter-server suites once more over gRPC alone: make test runs them on the best lane (the local
one, as every shard here shares the host), so both carriers give the same answers to the same tests. The
TCP lane has its own cases in test_lane.py. test_durability.py runs once, on the lane: what is logged and
replayed is the same request bytes whichever carrier brought them, and its kill -9 timing tests need not
run twice."""

import os
import subprocess
import sys

import pytest

SUITES = [
    "tests/integration/test_parameter_server.py",
    "tests/integration/test_tables.py",
    "tests/integration/test_checkpoint.py",
    "tests/integration/test_client_unavailable.py",
    "tests/integration/test_tensor_sharding.py",
]


@pytest.mark.slow
def test_the_parameter_server_suites_pass_over_grpc_alone():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
        env={**os.environ, "NANODIST_LANES": "off"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
