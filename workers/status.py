"""`nanodist status`: one screen on the health and state of every service of a cluster."""

from __future__ import annotations

import argparse
import sys

import grpc

from nanodist.client import BarrierClient, LockClient, NanodistError, ParameterServerClient
from nanodist.client.health import check
from nanodist.settings import env_default
from nanodist.workers.train import add_client_security_flags, apply_client_security_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ps", default=env_default("ps", "127.0.0.1:50051"), help="comma-separated shard addresses")
    parser.add_argument("--barrier", default=env_default("barrier_address", "127.0.0.1:50061"))
    parser.add_argument("--lock", default=env_default("lock_address", "127.0.0.1:50071"))
    add_client_security_flags(parser)


def _health(address: str) -> str:
    try:
        return check(address)
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[attr-defined]


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)


def report(ps: list[str], barrier: str, lock: str) -> tuple[list[str], bool]:
    """The status lines, and whether every service is serving."""
    lines, healthy = [], True
    lines.append("parameter servers")
    for address in ps:
        status = _health(address)
        healthy &= status == "SERVING"
        line = f"  {address}  {status}"
        if status == "SERVING":
            with ParameterServerClient([address], timeout=5) as client:
                s = client.stats()[0]
            line += (
                f"  mode {s.mode}  workers {s.num_workers}  keys {s.num_keys}  {_size(s.total_bytes)}  "
                f"pushes {s.pushes_applied} (duplicates {s.pushes_deduplicated})  clocks {list(s.worker_clocks)}  "
                f"durability {s.durability}"
                + (f" ({s.wal_records} log records, {s.wal_fsyncs} fsyncs)" if s.durability == "wal" else "")
            )
        lines.append(line)
    status = _health(barrier)
    healthy &= status == "SERVING"
    lines.append(f"barrier {barrier}  {status}")
    if status == "SERVING":
        with BarrierClient(barrier, "nanodist-status", timeout=5) as client:
            for b in client.status():
                state = f"broken: {b.broken_reason}" if b.broken_reason else "ok"
                lines.append(
                    f"  {b.name}  parties {b.parties}  generation {b.generation}  arrived "
                    f"{list(b.arrived)}  missing {list(b.missing)}  {state}"
                )
    status = _health(lock)
    healthy &= status == "SERVING"
    lines.append(f"lock {lock}  {status}")
    if status == "SERVING":
        with LockClient(lock, "nanodist-status", timeout=5) as client:
            for lk in client.status():
                holders = [f"{h.owner} (token {h.fencing_token}, {h.expires_in_ms} ms left)" for h in lk.holders]
                lines.append(
                    f"  {lk.name}  holders {holders or '-'}  waiters {list(lk.waiters) or '-'}  "
                    f"last token {lk.last_fencing_token}"
                )
    return lines, healthy


def run(args: argparse.Namespace) -> None:
    apply_client_security_flags(args)
    try:
        lines, healthy = report([a for a in args.ps.split(",") if a], args.barrier, args.lock)
    except NanodistError as error:
        print(f"nanodist status: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(lines))
    raise SystemExit(0 if healthy else 1)
