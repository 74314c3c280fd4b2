"""A worker's TLS and token flags secure every channel it opens: shards, barrier, locks, and the TCP rendezvous."""

import json
import os
import subprocess
import uuid

import pytest

from nanodist.client import ClientSecurity
from nanodist.services.common.devcerts import make_ca, make_leaf
from tests.conftest import nanodist_command

pytestmark = pytest.mark.slow  # trains, or runs the whole cluster: make test, not test-fast

SECURITY_VARIABLES = ("TLS_CA", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY", "TLS_SERVER_NAME", "AUTH_TOKEN_FILE")


@pytest.fixture
def pki(tmp_path):
    ca = make_ca(str(tmp_path))
    make_leaf(str(tmp_path), "server", ca, ["localhost", "127.0.0.1"])
    make_leaf(str(tmp_path), "client", ca, [], client=True)
    (tmp_path / "tokens").write_text("s3cret worker\n")
    (tmp_path / "worker.token").write_text("s3cret\n")
    return tmp_path


def flags_only_environment() -> dict[str, str]:
    """The test's environment without any NANODIST_TLS_* or token variable: only the flags may secure the calls."""
    return {k: v for k, v in os.environ.items() if k.removeprefix("NANODIST_") not in SECURITY_VARIABLES}


def test_flags_alone_secure_a_tcp_group_against_mutual_tls_and_token_servers(start_server, pki, tmp_path):
    p = str(pki)
    server_flags = ["--tls-cert", f"{p}/server.pem", "--tls-key", f"{p}/server-key.pem"]
    server_flags += ["--tls-client-ca", f"{p}/ca.pem", "--auth-token-file", f"{p}/tokens"]
    health = ClientSecurity(f"{p}/ca.pem", f"{p}/client.pem", f"{p}/client-key.pem")
    ps = start_server("ps", "--mode", "bsp", "--num-workers", "1", *server_flags, security=health)
    barrier = start_server("barrier", *server_flags, security=health)
    lock = start_server("lock", *server_flags, security=health)
    security = ["--tls-ca", f"{p}/ca.pem", "--tls-client-cert", f"{p}/client.pem"]
    security += ["--tls-client-key", f"{p}/client-key.pem", "--auth-token-file", f"{p}/worker.token"]
    run_id = f"tls-{uuid.uuid4().hex[:8]}"
    worker = nanodist_command(
        "worker",
        *("--ps", ps.address, "--barrier", barrier.address, "--lock", lock.address),
        *("--run-id", run_id, "--runs-dir", str(tmp_path), "--backend", "tcp", "--group-size", "2"),
        *("--epochs", "1", "--max-steps", "3", "--timeout", "30"),
        *security,
    )
    procs = [
        subprocess.Popen(worker, env=flags_only_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert json.loads((tmp_path / run_id / "metrics.json").read_text())["world_size"] == 2

    status = ["status", "--ps", ps.address, "--barrier", barrier.address, "--lock", lock.address]
    result = subprocess.run(
        nanodist_command(*status, *security), env=flags_only_environment(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{ps.address}  SERVING  mode bsp" in result.stdout
    plaintext = subprocess.run(
        nanodist_command(*status), env=flags_only_environment(), capture_output=True, text=True, timeout=60
    )
    assert plaintext.returncode == 1, "without the flags the same calls are refused"
