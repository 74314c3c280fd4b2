"""The anchor: a grpc.aio server with identity serializers that stores and returns raw bytes.

python raw_echo_server.py PORT [PORT_FILE]   (PORT 0 and a PORT_FILE: the port it bound is written there)
"""

from __future__ import annotations

import asyncio
import sys

import grpc

MAX = 1 << 30


async def main(port: int, port_file: str | None) -> None:
    stored = {"blob": b""}

    async def push(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        stored["blob"] = data
        return b"ok"

    async def pull(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        size = int(request)
        if len(stored["blob"]) != size:
            stored["blob"] = bytes(size)
        return stored["blob"]

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "raw.Raw",
        {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in (("Push", push), ("Pull", pull), ("Echo", echo))
        },
    )
    server = grpc.aio.server(options=[("grpc.max_send_message_length", MAX), ("grpc.max_receive_message_length", MAX)])
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if port_file:  # port 0 and a file: the port the kernel picked, which no other process holds
        with open(port_file, "w") as f:
            f.write(f"{bound}\n")
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
