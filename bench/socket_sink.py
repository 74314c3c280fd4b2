"""The TCP-socket anchor's far end: a process that takes pushes with recv_into and serves pulls with sendall.

python socket_sink.py PORT_FILE   (binds port 0 and writes the port it got to PORT_FILE)

Frames: 1 byte of kind (P push, L pull) and 8 bytes of size; a push's bytes follow and 1 byte answers
it; a pull is answered with its bytes. This is what a socket between two processes moves at best,
with no framing, copying or protocol of nanodist's in the way.
"""

from __future__ import annotations

import socket
import struct
import sys

FRAME = struct.Struct("<cQ")


def serve(conn: socket.socket) -> None:
    buffer = bytearray()
    while True:
        head = conn.recv(FRAME.size, socket.MSG_WAITALL)
        if len(head) < FRAME.size:
            return
        kind, size = FRAME.unpack(head)
        if len(buffer) < size:
            buffer = bytearray(size)
        view = memoryview(buffer)[:size]
        if kind == b"P":
            got = 0
            while got < size:
                got += conn.recv_into(view[got:])
            conn.sendall(b"k")
        else:
            conn.sendall(view)


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with open(sys.argv[1], "w") as f:
        f.write(f"{listener.getsockname()[1]}\n")
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            serve(conn)


if __name__ == "__main__":
    main()
