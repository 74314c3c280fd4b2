"""from_env's TCP arguments: what is missing or malformed is named (argument and environment variable)."""

from __future__ import annotations

import pytest

from nanodist.workers.comm import CommError, SingleProcess, from_env

TCP_ENV = ("NANODIST_BACKEND", "NANODIST_WORLD_SIZE", "NANODIST_PEERS", "NANODIST_RANK", "NANODIST_COMM_TIMEOUT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TCP_ENV:
        monkeypatch.delenv(name, raising=False)


def test_without_a_group_it_is_a_group_of_one() -> None:
    assert isinstance(from_env(), SingleProcess)


def test_tcp_without_a_store_asks_for_one() -> None:
    with pytest.raises(
        CommError, match=r"needs store= to rendezvous .*or a static peer list \(peers= or NANODIST_PEERS\)"
    ):
        from_env("tcp", world_size=2)


def test_tcp_without_a_size_names_the_argument_and_the_variable() -> None:
    with pytest.raises(CommError, match=r"world_size= or NANODIST_WORLD_SIZE"):
        from_env("tcp")


def test_static_peers_need_the_rank() -> None:
    with pytest.raises(CommError, match=r"needs the rank \(rank= or NANODIST_RANK\)"):
        from_env("tcp", peers="127.0.0.1:1,127.0.0.1:2")


def test_a_malformed_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANODIST_WORLD_SIZE", "four")
    with pytest.raises(CommError, match=r"NANODIST_WORLD_SIZE='four' is not a valid int"):
        from_env("tcp")
