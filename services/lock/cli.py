"""`nanodist serve lock`: the lock and key-value server's flags, and the process that serves them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable

import grpc

from nanodist.services.common import config as common_config
from nanodist.services.common.errors import ConfigurationError
from nanodist.services.common.etcd import Etcd, add_store_argument, parse_store
from nanodist.services.common.handlers import servicer_handler
from nanodist.services.common.runtime import serve
from nanodist.services.lock.etcd_kv import EtcdKeyValueStore
from nanodist.services.lock.etcd_locks import EtcdLockTable
from nanodist.services.lock.etcd_server import EtcdLockService
from nanodist.services.lock.kv import KeyValueStore
from nanodist.services.lock.locks import FencingTokens, LockTable
from nanodist.services.lock.persistence import DEFAULT_MAX_LOG_BYTES, Persistence
from nanodist.services.lock.server import KeyValueService, LockService, Synced, in_memory
from nanodist.settings import env_default, env_optional
from nanodist.v1 import lock_pb2 as pb
from nanodist.v1 import lock_pb2_grpc

log = logging.getLogger("nanodist.lock")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common_config.add_server_flags(parser, default_port=50071)
    env = env_default
    add_store_argument(parser, "locks' and keys'")
    parser.add_argument(
        "--state-dir",
        default=env_optional("state_dir"),
        help="directory for the key-value store, the held locks and the fencing-token ceiling: written "
        "and fsynced before each answer, restored at start (default: memory only; env NANODIST_STATE_DIR)",
    )
    parser.add_argument(
        "--max-log-bytes",
        type=int,
        default=env("max_log_bytes", DEFAULT_MAX_LOG_BYTES),
        help="with --state-dir: snapshot the state once the log has grown by this much (default 64 MiB)",
    )
    parser.add_argument(
        "--max-value-bytes",
        type=int,
        default=env("max_value_bytes", 1 << 20),
        help="largest key-value value (default 1 MiB)",
    )
    parser.add_argument(
        "--max-keys",
        type=int,
        default=env("max_keys", 1_000_000),
        help="most keys the key-value store holds (default 1,000,000)",
    )


def _state_dir(path: str | None) -> None:
    if path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise ConfigurationError(f"--state-dir {path}: cannot create it ({error.strerror or error})") from None


def _register(locks: lock_pb2_grpc.LockServicer, kv: KeyValueService) -> Callable[[grpc.aio.Server], list[str]]:
    def register(server: grpc.aio.Server) -> list[str]:
        server.add_generic_rpc_handlers(
            (
                servicer_handler(locks, pb.DESCRIPTOR.services_by_name["Lock"]),
                servicer_handler(kv, pb.DESCRIPTOR.services_by_name["KeyValue"]),
            )
        )
        return [pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Lock", "KeyValue")]

    return register


def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM. A bad setting exits with status 2 and one line on stderr, before anything binds."""
    with common_config.exit_on_configuration_error("nanodist serve lock"):
        config = common_config.server_config(args)
        if args.store != "embedded":
            if args.state_dir:
                raise ConfigurationError("--state-dir: the etcd store keeps the state; give one or the other")
            address = parse_store(args.store)

            async def on_etcd() -> None:
                etcd = Etcd(address)
                store, table = EtcdKeyValueStore(etcd, args.max_value_bytes), EtcdLockTable(etcd)
                register = _register(EtcdLockService(table), KeyValueService(store))

                async def close() -> None:
                    await store.close()
                    await table.close()
                    await etcd.close()

                await serve("lock", config, register, close)

            asyncio.run(on_etcd())
            return
        _state_dir(args.state_dir)

        async def main() -> None:
            table = LockTable(FencingTokens(args.state_dir))
            store = KeyValueStore(args.max_value_bytes, args.max_keys)
            persistence: Persistence | None = None
            synced: Synced = in_memory
            if args.state_dir:
                persistence = Persistence(args.state_dir, store, table, args.max_log_bytes)
                persistence.start()
                synced = persistence.synced
            else:
                log.warning("no --state-dir: the key-value store, counters and held locks live in memory only")
            table.leases.start()  # restored leases lapse unless their holders renew them
            register = _register(LockService(table, synced), KeyValueService(store, synced))
            await serve("lock", config, register, persistence.close if persistence else None)

        asyncio.run(main())
