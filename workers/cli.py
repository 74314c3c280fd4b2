"""The `nanodist` command: serve a role, run a worker, launch a local cluster, or check collectives."""

from __future__ import annotations

import argparse

from nanodist import __version__
from nanodist.services.common.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    from nanodist.client import health
    from nanodist.services.barrier import server as barrier_server
    from nanodist.services.lock import server as lock_server
    from nanodist.services.parameter_server import server as ps_server
    from nanodist.workers import launcher, status, train
    from nanodist.workers.comm import check

    parser = argparse.ArgumentParser(prog="nanodist", description="nanodist: distributed training over gRPC services")
    parser.add_argument("--version", action="version", version=f"nanodist {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    roles = commands.add_parser("serve", help="run one service").add_subparsers(dest="role", required=True)
    ps_server.add_arguments(roles.add_parser("ps", help="parameter-server shard"))
    barrier_server.add_arguments(roles.add_parser("barrier", help="barrier service"))
    lock_server.add_arguments(roles.add_parser("lock", help="lock, atomic counter and key-value service"))
    train.add_arguments(commands.add_parser("worker", help="a data-parallel training worker"))
    launcher.add_arguments(commands.add_parser("up", help="run a whole cluster as local processes and train"))
    check.add_arguments(commands.add_parser("comm-check", help="check collectives and print bandwidth"))
    health.add_arguments(commands.add_parser("health", help="gRPC health check; exit 0 if SERVING"))
    status.add_arguments(commands.add_parser("status", help="health and state of every service of a cluster"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        setup_logging(args.log_format)
        if args.role == "ps":
            from nanodist.services.parameter_server import server
        elif args.role == "barrier":
            from nanodist.services.barrier import server
        else:
            from nanodist.services.lock import server
        server.run(args)
    elif args.command == "worker":
        from nanodist.workers import train

        train.run(args)
    elif args.command == "status":
        from nanodist.workers import status

        status.run(args)
    elif args.command == "health":
        from nanodist.client import health

        health.run(args)
    elif args.command == "up":
        from nanodist.workers import launcher

        launcher.run(args)
    else:
        from nanodist.workers.comm import check

        check.run(args)


if __name__ == "__main__":
    main()
