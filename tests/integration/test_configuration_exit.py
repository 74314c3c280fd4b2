"""`nanodist serve` turns a bad setting into exit status 2 and one clear line on stderr, as argparse does."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import nanodist_command


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nanodist_command("serve", *args), capture_output=True, text=True, timeout=60)


def test_wal_durability_without_a_directory_exits_2_with_one_line() -> None:
    result = serve("ps", "--port", "0", "--durability", "wal")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["nanodist serve ps: error: --durability wal needs --checkpoint-dir"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--num-workers", "0"), "--num-workers must be >= 1, got 0"),
        (("--mode", "ssp", "--staleness", "-2"), "--staleness must be >= 0, got -2"),
    ],
)
def test_impossible_store_settings_exit_2(flags: tuple[str, ...], message: str) -> None:
    result = serve("ps", "--port", "0", *flags)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"nanodist serve ps: error: {message}"]


@pytest.mark.parametrize("role", ["ps", "barrier", "lock"])
def test_every_role_exits_2_on_half_a_tls_setting(role: str, tmp_path) -> None:
    result = serve(role, "--port", "0", "--tls-cert", str(tmp_path / "server.pem"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"nanodist serve {role}: error: --tls-cert and --tls-key go together"]
