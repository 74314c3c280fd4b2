"""`nanodist serve ps`: the parameter server's flags, and the process that serves them."""

from __future__ import annotations

import argparse
import asyncio

import grpc

from nanodist.services.common import config as common_config
from nanodist.services.common.errors import ConfigurationError
from nanodist.services.common.runtime import serve
from nanodist.services.parameter_server.coordinator import Coordinator
from nanodist.services.parameter_server.durability import Durability, Persistence
from nanodist.services.parameter_server.replica_set import ReplicaSet
from nanodist.services.parameter_server.server import SERVICE, ParameterServerService
from nanodist.services.parameter_server.store import Limits, Mode, Store
from nanodist.settings import env_default, env_optional


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = env_default
    common_config.add_server_flags(parser, default_port=50051)
    parser.add_argument(
        "--mode",
        choices=[m.value for m in Mode],
        default=env("mode", "asp"),
        help="consistency: bsp, asp or ssp (default asp; env NANODIST_MODE)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=env("num_workers", 1),
        help="pushes per step under BSP, and workers tracked by SSP (an elastic job's pushes name their own count)",
    )
    parser.add_argument(
        "--staleness",
        type=int,
        default=env("staleness", 0),
        help="SSP bound s: a pull at clock c waits for every worker to reach c - s",
    )
    parser.add_argument(
        "--dedup-window",
        type=int,
        default=env("dedup_window", 65536),
        help="how many recent request_ids are remembered for exactly-once pushes",
    )
    parser.add_argument(
        "--max-keys",
        type=int,
        default=env("max_keys", Limits.max_keys),
        help=f"most keys this shard holds (default {Limits.max_keys}); Init past it is RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=env("max_bytes", Limits.max_bytes),
        help=f"most bytes of values and optimizer state this shard holds (default {Limits.max_bytes >> 30} GiB)",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="apply gradients holding NaN or Inf instead of refusing them with INVALID_ARGUMENT",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=env_optional("checkpoint_dir"),
        help="restore from and checkpoint into this directory (env NANODIST_CHECKPOINT_DIR)",
    )
    parser.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=env_optional("durability"),
        help="none, checkpoint or wal (default: checkpoint with --checkpoint-dir, else none); "
        "wal fsyncs every push before its ack (env NANODIST_DURABILITY)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=float,
        default=env("checkpoint_interval", 300.0),
        help="seconds between checkpoints when something changed (a final one is written on SIGTERM)",
    )
    parser.add_argument(
        "--max-log-bytes",
        type=int,
        default=env("max_log_bytes", 1 << 30),
        help="wal: checkpoint once the log has grown by this much, so that it can start over (default 1 GiB)",
    )
    parser.add_argument(
        "--lanes",
        choices=["on", "tcp", "off"],
        default=env("lanes", "on"),
        help="serve Push and Pull on the tensor lane too (on; tcp, which clients read as 'the TCP lane even "
        "on this host', serves the same): shared memory for clients on this host, a TCP connection of its "
        "own for the others (no TCP lane with TLS on); env NANODIST_LANES, which clients read too",
    )
    parser.add_argument(
        "--lane-port",
        type=int,
        default=env("lane_port", 0),
        help="the TCP lane's port (default 0: one the kernel picks, which OpenLane tells clients; fix it where "
        "a firewall or a NetworkPolicy must name it; env NANODIST_LANE_PORT)",
    )
    parser.add_argument(
        "--replica-set",
        default=env_optional("replica_set"),
        help="keep this shard on several replicas: the name they share; one is primary, the others back it up "
        "(needs --coordinator; env NANODIST_REPLICA_SET; docs/durability.md)",
    )
    parser.add_argument(
        "--coordinator",
        default=env_optional("coordinator"),
        help="the lock service (HOST:PORT, or replicas HOST:PORT,HOST:PORT) where a replica set elects its primary "
        "(env NANODIST_COORDINATOR)",
    )
    parser.add_argument(
        "--replica-ttl",
        type=float,
        default=env("replica_ttl", 3.0),
        help="seconds a replica set's primary keeps its lease without renewing it; a backup takes over within "
        "about this long after the primary dies (default 3; env NANODIST_REPLICA_TTL)",
    )
    parser.add_argument(
        "--advertise",
        default=env_optional("advertise"),
        help="HOST:PORT at which clients and the other replicas reach this one (default: --host and the bound port)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=env("checkpoint_every", 0),
        help="also checkpoint after this many applied pushes (default 0: off)",
    )


def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM. A bad setting exits with status 2 and one line on stderr, before anything binds."""
    with common_config.exit_on_configuration_error("nanodist serve ps"):
        limits = Limits(args.max_keys, args.max_bytes, reject_nonfinite=not args.allow_nonfinite)
        store = Store(Mode(args.mode), args.num_workers, args.staleness, args.dedup_window, limits)
        config = common_config.server_config(args)
        durability = Durability(args.durability or ("checkpoint" if args.checkpoint_dir else "none"))
        check_replica_set(args, durability, config)
        persistence = Persistence(
            store,
            durability,
            args.checkpoint_dir,
            args.checkpoint_interval,
            args.checkpoint_every,
            args.max_log_bytes,
        )

        async def main() -> None:
            service = ParameterServerService(store, config.max_message_bytes, persistence)
            if args.replica_set:
                service.replicas = ReplicaSet(
                    args.replica_set,
                    Coordinator(args.coordinator),
                    args.replica_ttl,
                    service,
                    lambda: Store(Mode(args.mode), args.num_workers, args.staleness, args.dedup_window, limits),
                    config.max_message_bytes,
                )
            if args.lanes != "off" and not args.replica_set:
                tls = bool(config.security and config.security.tls_cert)
                service.open_lanes(config.host, args.lane_port, tcp=not tls)
            await persistence.start(service.apply)
            service.update_gauges()

            def register(server: grpc.aio.Server) -> list[str]:
                server.add_generic_rpc_handlers((service.generic_handler(),))
                return [SERVICE]

            role = f"parameter server ({args.mode}, durability {durability.value})"

            def start_replica(port: int) -> None:
                if service.replicas is not None:
                    service.replicas.start(args.advertise or f"{config.host}:{port}")

            if args.replica_set:
                role += f", replica set {args.replica_set}"
            await serve(role, config, register, persistence.close, service.stopping, start_replica)

        asyncio.run(main())


def check_replica_set(args: argparse.Namespace, durability: Durability, config: common_config.ServerConfig) -> None:
    if not args.replica_set:
        return
    if not args.coordinator:
        raise ConfigurationError("--replica-set needs --coordinator, the lock service that elects the primary")
    if args.replica_ttl <= 0:
        raise ConfigurationError(f"--replica-ttl must be > 0, got {args.replica_ttl}")
    if durability is not Durability.NONE:
        raise ConfigurationError(
            "--replica-set keeps the shard on its replicas, not on disk: --durability must be none"
        )
    if config.security and (config.security.tls_cert or config.security.auth_token_file):
        raise ConfigurationError("--replica-set does not run with TLS or tokens yet (the replicas talk in plaintext)")
