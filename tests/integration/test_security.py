"""TLS, mutual TLS, certificate rotation, bearer tokens and roles, against real servers."""

import os
import shutil

import numpy as np
import pytest

from nanodist.client import ParameterServerClient, RetryPolicy
from nanodist.client.errors import NanodistError
from nanodist.client.health import check
from nanodist.client.rpc import ClientSecurity
from nanodist.services.common.devcerts import make_ca, make_leaf

NO_RETRY = RetryPolicy(total_seconds=0)


@pytest.fixture
def pki(tmp_path):
    """ca.pem + server.pem + client.pem (and keys) in tmp_path, like `make certs`."""
    ca = make_ca(str(tmp_path))
    make_leaf(str(tmp_path), "server", ca, ["localhost", "127.0.0.1"])
    make_leaf(str(tmp_path), "client", ca, [], client=True)
    return tmp_path


def client(address: str, monkeypatch, **settings: str) -> ParameterServerClient:
    """A client whose security comes from NANODIST_* variables, as a worker's does."""
    for name in ("TLS_CA", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY", "TLS_SERVER_NAME", "AUTH_TOKEN_FILE"):
        monkeypatch.delenv(f"NANODIST_{name}", raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(f"NANODIST_{name}", value)
    return ParameterServerClient([address], retry=NO_RETRY, timeout=5)


def works(ps: ParameterServerClient) -> bool:
    try:
        ps.init({"w": np.zeros(2)})
        return True
    except NanodistError:
        return False


def test_plaintext_client_cannot_talk_to_a_tls_server(start_server, pki, monkeypatch):
    server = start_server(
        "ps",
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server-key.pem"),
        security=ClientSecurity(ca=str(pki / "ca.pem")),
    )
    assert not works(client(server.address, monkeypatch))
    assert works(client(server.address, monkeypatch, TLS_CA=str(pki / "ca.pem")))


def test_mutual_tls_needs_a_client_certificate(start_server, pki, monkeypatch):
    mtls = ClientSecurity(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client-key.pem"))
    server = start_server(
        "ps",
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server-key.pem"),
        "--tls-client-ca",
        str(pki / "ca.pem"),
        security=mtls,
    )
    assert not works(client(server.address, monkeypatch, TLS_CA=str(pki / "ca.pem")))
    assert works(
        client(
            server.address,
            monkeypatch,
            TLS_CA=str(pki / "ca.pem"),
            TLS_CLIENT_CERT=str(pki / "client.pem"),
            TLS_CLIENT_KEY=str(pki / "client-key.pem"),
        )
    )


def test_a_rotated_certificate_is_used_without_a_restart(start_server, pki, tmp_path, monkeypatch):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(pki / name, live / name)
    server = start_server(
        "ps",
        "--tls-cert",
        str(live / "server.pem"),
        "--tls-key",
        str(live / "server-key.pem"),
        security=ClientSecurity(ca=str(pki / "ca.pem")),
    )
    other = tmp_path / "other"
    other.mkdir()
    make_leaf(str(other), "server", make_ca(str(other)), ["localhost", "127.0.0.1"])
    assert works(client(server.address, monkeypatch, TLS_CA=str(pki / "ca.pem")))
    for name in ("server-key.pem", "server.pem"):  # swap in a certificate from another CA
        os.replace(other / name, live / name)
    assert works(client(server.address, monkeypatch, TLS_CA=str(other / "ca.pem")))
    assert not works(client(server.address, monkeypatch, TLS_CA=str(pki / "ca.pem")))


def test_tokens_and_roles(start_server, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-worker worker\ns3cret-reader reader  # read-only dashboards\n")
    server = start_server("ps", "--auth-token-file", str(tokens))
    for name, text in (("worker", "s3cret-worker"), ("reader", "s3cret-reader"), ("bad", "guess")):
        (tmp_path / name).write_text(text + "\n")

    with pytest.raises(NanodistError) as missing:
        client(server.address, monkeypatch).init({"w": np.zeros(2)})
    assert missing.value.code.name == "UNAUTHENTICATED"
    with pytest.raises(NanodistError) as bad:
        client(server.address, monkeypatch, AUTH_TOKEN_FILE=str(tmp_path / "bad")).pull(["w"])
    assert bad.value.code.name == "UNAUTHENTICATED"

    writer = client(server.address, monkeypatch, AUTH_TOKEN_FILE=str(tmp_path / "worker"))
    writer.init({"w": np.zeros(2)})
    writer.push({"w": np.ones(2)})
    reader = client(server.address, monkeypatch, AUTH_TOKEN_FILE=str(tmp_path / "reader"))
    assert reader.pull(["w"]).versions == {"w": 1}
    with pytest.raises(NanodistError) as denied:
        reader.push({"w": np.ones(2)})
    assert denied.value.code.name == "PERMISSION_DENIED" and "role 'reader' may not call" in denied.value.message
    # health stays open for orchestrators
    monkeypatch.delenv("NANODIST_AUTH_TOKEN_FILE")
    assert check(server.address) == "SERVING"


def test_serving_beyond_loopback_without_protection_warns(start_server, tmp_path):
    server = start_server("ps", "--host", "0.0.0.0")
    log = (tmp_path / f"ps-{server.port}.log").read_text()
    assert "with neither TLS nor token authentication" in log


def test_client_security_reads_the_first_token_field(tmp_path):
    (tmp_path / "t").write_text("# comment\n\nabc worker\n")
    assert ClientSecurity(token_file=str(tmp_path / "t")).token() == "abc"
