"""`nanodist status`: one screen on the health and state of every service of a cluster."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from nanodist.client import BarrierClient, ClientSecurity, LockClient, NanodistError, ParameterServerClient
from nanodist.client.health import check
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.workers.config import Endpoints, SecurityFlags
from nanodist.workers.settings import add_flags, from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, Endpoints)
    add_flags(parser, SecurityFlags)


def _health(address: str, security: ClientSecurity | None) -> str:
    try:
        return check(address, security=security)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code.name


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _shard_state(s: ps.StatsResponse) -> str:
    r = s.replicas
    if r.name and r.role != "primary":
        return (
            f"  replica set {r.name}: {r.role} of {r.primary or '(no primary known)'}  epoch {r.epoch}  change {r.seq}"
        )
    line = (
        f"  mode {s.mode}  workers {s.num_workers}  keys {s.num_keys}  {_size(s.total_bytes)}  "
        f"pushes {s.pushes_applied} (duplicates {s.pushes_deduplicated})  clocks {list(s.worker_clocks)}  "
        f"durability {s.durability}"
        + (f" ({s.wal_records} log records, {s.wal_fsyncs} fsyncs)" if s.durability == "wal" else "")
    )
    if r.name:
        followers = [
            f"{f.address} ({'in sync' if f.in_sync else 'catching up'}, {f.behind} behind)" for f in r.followers
        ]
        line += f"\n    replica set {r.name}: primary  epoch {r.epoch}  change {r.seq}  backups {followers or '-'}"
    return line


def report(
    ps: Sequence[str], barrier: str, lock: str, security: ClientSecurity | None = None
) -> tuple[list[str], bool]:
    """The status lines, and whether every service is serving."""
    lines, healthy = [], True
    lines.append("parameter servers")
    for shard in ps:
        for address in shard.split("+"):  # a replica set names each of its replicas
            status = _health(address, security)
            healthy &= status == "SERVING"
            line = f"  {address}  {status}"
            if status == "SERVING":
                with ParameterServerClient([address], timeout=5, security=security) as client:
                    line += _shard_state(client.stats()[0])
            lines.append(line)
    status = _health(barrier, security)
    healthy &= status == "SERVING"
    lines.append(f"barrier {barrier}  {status}")
    if status == "SERVING":
        with BarrierClient(barrier, "nanodist-status", timeout=5, security=security) as client:
            for b in client.status():
                state = f"broken: {b.broken_reason}" if b.broken_reason else "ok"
                lines.append(
                    f"  {b.name}  parties {b.parties}  generation {b.generation}  arrived "
                    f"{list(b.arrived)}  missing {list(b.missing)}  {state}"
                )
    status = _health(lock, security)
    healthy &= status == "SERVING"
    lines.append(f"lock {lock}  {status}")
    if status == "SERVING":
        with LockClient(lock, "nanodist-status", timeout=5, security=security) as client:
            for lk in client.status():
                holders = [f"{h.owner} (token {h.fencing_token}, {h.expires_in_ms} ms left)" for h in lk.holders]
                lines.append(
                    f"  {lk.name}  holders {holders or '-'}  waiters {list(lk.waiters) or '-'}  "
                    f"last token {lk.last_fencing_token}"
                )
    return lines, healthy


def run(args: argparse.Namespace) -> None:
    endpoints = from_args(Endpoints, args)
    security = from_args(SecurityFlags, args).client_security()
    try:
        lines, healthy = report(endpoints.ps, endpoints.barrier, endpoints.lock, security)
    except NanodistError as error:
        print(f"nanodist status: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(lines))
    raise SystemExit(0 if healthy else 1)
