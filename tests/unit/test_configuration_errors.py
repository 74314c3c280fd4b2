"""Library classes refuse bad settings with ConfigurationError; none of them exits the process."""

from __future__ import annotations

import argparse

import pytest

from nanodist.services.common.config import add_server_flags, server_config
from nanodist.services.common.errors import ConfigurationError
from nanodist.services.common.security import SecurityConfig, load_tokens
from nanodist.services.parameter_server.durability import Durability, Persistence
from nanodist.services.parameter_server.store import Store


def test_a_configuration_error_is_a_value_error_not_an_exit() -> None:
    assert issubclass(ConfigurationError, ValueError)
    assert not issubclass(ConfigurationError, SystemExit)


@pytest.mark.parametrize(
    ("mode", "directory", "message"),
    [
        (Durability.WAL, None, "--durability wal needs --checkpoint-dir"),
        (Durability.CHECKPOINT, None, "--durability checkpoint needs --checkpoint-dir"),
        (Durability.NONE, "/tmp/somewhere", "--durability none keeps nothing on disk"),
    ],
)
def test_persistence_with_contradictory_settings_raises(mode: Durability, directory: str | None, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Persistence(Store(), mode, directory)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_workers": 0}, "--num-workers must be >= 1, got 0"),
        ({"staleness": -1}, "--staleness must be >= 0, got -1"),
        ({"dedup_window": -5}, "--dedup-window must be >= 0, got -5"),
    ],
)
def test_a_store_with_impossible_settings_raises(settings: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Store(**settings)


def test_security_settings_are_checked_on_construction(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="--tls-cert and --tls-key go together"):
        SecurityConfig(tls_cert=str(tmp_path / "server.pem"))
    with pytest.raises(ConfigurationError, match="--tls-client-ca"):
        SecurityConfig(tls_client_ca=str(tmp_path / "ca.pem"))
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError, match=f"--tls-cert {missing}: no such file"):
        SecurityConfig(tls_cert=str(missing), tls_key=str(missing))


def test_the_flags_become_a_checked_config(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_server_flags(parser, default_port=1)
    args = parser.parse_args(["--tls-key", str(tmp_path / "key.pem")])
    with pytest.raises(ConfigurationError, match="--tls-cert and --tls-key go together"):
        server_config(args)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no tokens"),
        ("# only a comment\n", "no tokens"),
        ("s3cret\n", ":1: expected 'TOKEN ROLE'"),
        ("a worker\nb superuser\n", ":2: expected 'TOKEN ROLE' with ROLE one of reader, worker, admin"),
    ],
)
def test_a_bad_token_file_raises_naming_the_flag_and_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=f"--auth-token-file {path}") as raised:
        load_tokens(str(path))
    assert message in str(raised.value)


def test_a_good_token_file_loads(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text("abc worker  # the trainers\n\nxyz admin\n")
    assert load_tokens(str(path)) == [(b"abc", "worker"), (b"xyz", "admin")]
