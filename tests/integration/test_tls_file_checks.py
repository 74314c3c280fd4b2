"""A TLS or token file that is missing or of the wrong kind is refused at start-up, by flag and file.

gRPC itself reports a private key given as the certificate only as "Failed to
bind to address"; `nanodist serve` names the flag, the file and the problem,
and exits 2 before it binds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nanodist.services.common.devcerts import make_ca, make_leaf
from tests.conftest import nanodist_command


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """ca.pem, server.pem, server-key.pem and a token file in tmp_path, like `make certs`."""
    ca = make_ca(str(tmp_path))
    make_leaf(str(tmp_path), "server", ca, ["localhost", "127.0.0.1"])
    (tmp_path / "tokens").write_text("t0ken worker\n")
    return tmp_path


def refused(role: str, *flags: str) -> str:
    """Start `nanodist serve ROLE FLAGS`; it must exit 2 with one line on stderr, which is returned."""
    result = subprocess.run(
        nanodist_command("serve", role, "--port", "0", *flags), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"nanodist serve {role}: error: "), line
    return line.removeprefix(f"nanodist serve {role}: error: ")


@pytest.mark.parametrize("role", ["ps", "barrier", "lock"])
def test_a_private_key_given_as_the_certificate_is_named(pki: Path, role: str) -> None:
    key = pki / "server-key.pem"
    assert refused(role, "--tls-cert", str(key), "--tls-key", str(key)) == (
        f"--tls-cert {key}: not a PEM certificate (found a private key)"
    )


def test_a_certificate_given_as_the_key_is_named(pki: Path) -> None:
    cert = pki / "server.pem"
    assert refused("ps", "--tls-cert", str(cert), "--tls-key", str(cert)) == (
        f"--tls-key {cert}: not a PEM private key (found a PEM certificate)"
    )


def test_a_client_ca_that_is_not_a_certificate_is_named(pki: Path) -> None:
    key = pki / "server-key.pem"
    flags = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(key), "--tls-client-ca", str(key))
    assert refused("ps", *flags) == f"--tls-client-ca {key}: not a PEM certificate (found a private key)"


def test_a_file_that_is_not_pem_at_all_is_named(pki: Path) -> None:
    junk = pki / "junk.pem"
    junk.write_bytes(os.urandom(64).replace(b"-", b"+"))
    assert refused("ps", "--tls-cert", str(junk), "--tls-key", str(pki / "server-key.pem")) == (
        f"--tls-cert {junk}: not a PEM certificate (found no PEM block)"
    )


def test_a_missing_certificate_is_named(pki: Path) -> None:
    missing = pki / "nowhere.pem"
    assert refused("barrier", "--tls-cert", str(missing), "--tls-key", str(pki / "server-key.pem")) == (
        f"--tls-cert {missing}: no such file"
    )


def test_an_unreadable_key_is_named(pki: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    key = pki / "server-key.pem"
    key.chmod(0)
    assert refused("ps", "--tls-cert", str(pki / "server.pem"), "--tls-key", str(key)) == (
        f"--tls-key {key}: not readable (permission denied)"
    )


def test_a_directory_given_as_the_token_file_is_named(pki: Path) -> None:
    assert refused("lock", "--auth-token-file", str(pki)) == f"--auth-token-file {pki}: is a directory, not a file"


def test_a_certificate_given_as_the_token_file_is_named(pki: Path) -> None:
    cert = pki / "server.pem"
    message = refused("ps", "--auth-token-file", str(cert))
    assert message.startswith(f"--auth-token-file {cert}:1: expected 'TOKEN ROLE'"), message
