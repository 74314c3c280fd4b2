"""`nanodist serve barrier`: the barrier server's flags, and the process that serves them."""

from __future__ import annotations

import argparse
import asyncio

import grpc

from nanodist.services.barrier.etcd_barriers import EtcdBarriers, run_watcher
from nanodist.services.barrier.etcd_server import EtcdBarrierService
from nanodist.services.barrier.server import BarrierService
from nanodist.services.common import config as common_config
from nanodist.services.common.etcd import Etcd, add_store_argument, parse_store
from nanodist.services.common.handlers import servicer_handler
from nanodist.services.common.runtime import serve
from nanodist.v1 import barrier_pb2 as pb
from nanodist.v1 import barrier_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common_config.add_server_flags(parser, default_port=50061)
    add_store_argument(parser, "barriers' and sessions'")


def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM. A bad setting exits with status 2 and one line on stderr, before anything binds."""
    with common_config.exit_on_configuration_error("nanodist serve barrier"):
        config = common_config.server_config(args)

        address = parse_store(args.store) if args.store != "embedded" else None

        async def main() -> None:
            service: barrier_pb2_grpc.BarrierServicer = BarrierService()
            watcher: asyncio.Task[None] | None = None
            if address is not None:
                etcd = Etcd(address)
                barriers = EtcdBarriers(etcd)
                service = EtcdBarrierService(barriers)
                watcher = asyncio.create_task(run_watcher(barriers))
            descriptor = pb.DESCRIPTOR.services_by_name["Barrier"]

            def register(server: grpc.aio.Server) -> list[str]:
                server.add_generic_rpc_handlers((servicer_handler(service, descriptor),))
                return [descriptor.full_name]

            async def close() -> None:
                if watcher is not None:
                    watcher.cancel()
                    await etcd.close()

            await serve("barrier", config, register, close)

        asyncio.run(main())
