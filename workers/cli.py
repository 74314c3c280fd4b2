"""The `nanodist` command: serve a role, run a worker, launch a local cluster, or check collectives.

Every subcommand is listed with its help line, but only the one that runs is
imported (with its flags): a container health check runs `nanodist health`
every few seconds and must not load the services, scikit-learn or MPI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nanodist import __version__


class Subcommand(Protocol):
    """A module with the flags and the entry point of one subcommand."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> None: ...


# Each loader imports its module only when called: that is the point of this table.
def _ps() -> Subcommand:
    from nanodist.services.parameter_server import cli

    return cli


def _barrier() -> Subcommand:
    from nanodist.services.barrier import cli

    return cli


def _lock() -> Subcommand:
    from nanodist.services.lock import cli

    return cli


def _worker() -> Subcommand:
    from nanodist.workers import train

    return train


def _up() -> Subcommand:
    from nanodist.workers import launcher

    return launcher


def _run() -> Subcommand:
    from nanodist.workers import run

    return run


def _comm_check() -> Subcommand:
    from nanodist.workers.comm import check

    return check


def _health() -> Subcommand:
    from nanodist.client import health

    return health


def _status() -> Subcommand:
    from nanodist.workers import status

    return status


@dataclass(frozen=True)
class Command:
    help: str
    load: Callable[[], Subcommand]


ROLES = {
    "ps": Command("parameter-server shard", _ps),
    "barrier": Command("barrier service", _barrier),
    "lock": Command("lock, atomic counter and key-value service", _lock),
}
COMMANDS = {
    "worker": Command("a training worker (data-parallel, or one pipeline stage)", _worker),
    "up": Command("run a whole cluster as local processes and train", _up),
    "run": Command("launch your training script as the workers of a job (like torchrun)", _run),
    "comm-check": Command("check collectives and print bandwidth", _comm_check),
    "health": Command("gRPC health check; exit 0 if SERVING", _health),
    "status": Command("health and state of every service of a cluster", _status),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: every subcommand by name and help, the chosen one with its flags."""
    # The top level takes no option with a value, so the first word that is not an option is the command.
    words = [a for a in argv if not a.startswith("-")]
    chosen = words[0] if words else None
    role = words[1] if chosen == "serve" and len(words) > 1 else None
    parser = argparse.ArgumentParser(prog="nanodist", description="nanodist: distributed training over gRPC services")
    parser.add_argument("--version", action="version", version=f"nanodist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run one service")
    roles = serve.add_subparsers(dest="role", required=True)
    for name, command in ROLES.items():
        _add(roles, name, command, name == role)
    for name, command in COMMANDS.items():
        _add(commands, name, command, name == chosen)
    return parser


def _add(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str, command: Command, chosen: bool
) -> None:
    parser = subparsers.add_parser(name, help=command.help)
    if chosen:
        module = command.load()
        module.add_arguments(parser)
        parser.set_defaults(run=module.run)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    if args.command == "serve":
        from nanodist.services.common.logs import setup_logging

        setup_logging(args.log_format)
    args.run(args)


if __name__ == "__main__":
    main()
