"""`nanodist` imports only the subcommand that runs, and still lists every one."""

import json
import subprocess
import sys

import pytest

from tests.conftest import nanodist_command

HEAVY = (
    "nanodist.services",
    "nanodist.services.parameter_server",
    "nanodist.workers.worker",
    "nanodist.workers.comm",
    "sklearn",
    "matplotlib",
    "mpi4py",
    "torch",
)


def modules_after(*argv: str) -> set[str]:
    """The modules loaded by `nanodist <argv>` (which exits, as --help does), in a fresh interpreter."""
    code = (
        "import json, sys\n"
        "from nanodist.workers import cli\n"
        "try:\n"
        f"    cli.main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MODULES', json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    line = [x for x in result.stdout.splitlines() if x.startswith("MODULES ")][-1]
    return set(json.loads(line.removeprefix("MODULES ")))


@pytest.mark.parametrize(
    "argv",
    [
        ("health", "--help"),
        ("health", "127.0.0.1:1", "--timeout", "0.1"),
        ("status", "--help"),
        ("--help",),
        ("serve", "--help"),
    ],
)
def test_light_subcommands_leave_the_heavy_modules_alone(argv):
    loaded = modules_after(*argv)
    assert "nanodist.workers.cli" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_chosen_subcommand_is_loaded():
    assert "nanodist.services.parameter_server" in modules_after("serve", "ps", "--help")
    assert "nanodist.workers.worker" in modules_after("worker", "--help")


def test_help_lists_every_subcommand_with_its_help_line():
    result = subprocess.run(nanodist_command("--help"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name, line in [
        ("serve", "run one service"),
        ("worker", "a training worker"),
        ("up", "run a whole cluster"),
        ("comm-check", "check collectives"),
        ("health", "gRPC health check"),
        ("status", "health and state of every service"),
    ]:
        assert name in result.stdout and line in result.stdout, name
    roles = subprocess.run(nanodist_command("serve", "--help"), capture_output=True, text=True, timeout=60)
    assert all(role in roles.stdout for role in ("parameter-server shard", "barrier service", "lock,"))


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("serve", "ps", "--help"), "--num-workers"),
        (("serve", "barrier", "--help"), "--port"),
        (("serve", "lock", "--help"), "--port"),
        (("worker", "--help"), "--pipeline-split"),
        (("up", "--help"), "--pipeline-split"),
        (("comm-check", "--help"), "--size-mb"),
        (("health", "--help"), "--service"),
        (("status", "--help"), "--auth-token-file"),
    ],
)
def test_each_subcommand_shows_its_own_flags(argv, flag):
    result = subprocess.run(nanodist_command(*argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout


def test_an_unknown_subcommand_is_refused():
    result = subprocess.run(nanodist_command("wrker"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "invalid choice: 'wrker'" in result.stderr
