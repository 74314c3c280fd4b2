"""BarrierClient: reusable named barriers that raise BarrierBroken instead of hanging."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

import grpc

from nanodist.client.errors import NanodistError, NotFound, from_rpc_error
from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import call, open_channel, trailing
from nanodist.v1 import barrier_pb2 as pb
from nanodist.v1 import barrier_pb2_grpc


class BarrierBroken(NanodistError):
    """The barrier broke (timeout, abort or a lost member); `missing` names who had not arrived."""

    def __init__(self, message: str, code: grpc.StatusCode, missing: list[str]) -> None:
        super().__init__(message, code)
        self.missing = missing


@dataclass(frozen=True)
class Released:
    generation: int
    arrival_index: int


def default_member_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class BarrierClient:
    """A member of one or more barriers, with a heartbeat session.

    The session is renewed in a background thread every ttl/3; if this process
    dies, the lease lapses and every barrier it belongs to breaks, naming it.
    """

    def __init__(
        self,
        address: str,
        member_id: str | None = None,
        *,
        session_ttl: float = 5.0,
        barriers: tuple[str, ...] | list[str] = (),
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.address = address
        self.member_id = member_id or default_member_id()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = open_channel(address)
        self._stub = barrier_pb2_grpc.BarrierStub(self._channel)
        opened = call(
            self._stub.OpenSession,
            pb.OpenSessionRequest(member_id=self.member_id, ttl_ms=int(session_ttl * 1000), barriers=list(barriers)),
            timeout,
            address,
            self.retry,
        )
        self.session_id = opened.session_id
        self._stop = threading.Event()
        self.session_lost: NanodistError | None = None
        self._heartbeat = threading.Thread(
            target=self._keep_alive,
            args=(opened.ttl_ms / 3000,),
            name=f"barrier-session-{self.member_id}",
            daemon=True,
        )
        self._heartbeat.start()

    def _keep_alive(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                call(
                    self._stub.KeepAlive,
                    pb.KeepAliveSessionRequest(session_id=self.session_id),
                    interval,
                    self.address,
                )
            except NotFound as error:
                self.session_lost = error
                return
            except NanodistError:
                continue  # transient; the lease has slack for two more tries

    def wait(self, name: str, parties: int, timeout: float | None = None) -> Released:
        """Block until `parties` members arrive; raise BarrierBroken naming the missing ones."""
        timeout = self.timeout if timeout is None else timeout
        request = pb.WaitRequest(
            name=name,
            parties=parties,
            member_id=self.member_id,
            timeout_ms=max(1, int(timeout * 1000)),
            session_id=self.session_id,
        )
        try:
            response = self._stub.Wait(request, timeout=timeout + 10)
        except grpc.RpcError as error:
            missing = trailing(error, "nanodist-missing")
            if missing is not None:
                raise BarrierBroken(
                    error.details(),
                    error.code(),  # type: ignore[attr-defined]
                    [m for m in missing.split(",") if m],
                ) from None
            raise from_rpc_error(error, self.address) from None
        return Released(response.generation, response.arrival_index)

    def abort(self, name: str, reason: str = "") -> int:
        return call(
            self._stub.Abort,
            pb.AbortRequest(name=name, member_id=self.member_id, reason=reason),
            self.timeout,
            self.address,
        ).generation

    def reset(self, name: str) -> int:
        return call(self._stub.Reset, pb.ResetRequest(name=name), self.timeout, self.address).generation

    def status(self, name: str = "") -> list[pb.BarrierState]:
        return list(
            call(
                self._stub.Status,
                pb.BarrierStatusRequest(name=name),
                self.timeout,
                self.address,
                self.retry,
            ).barriers
        )

    def close(self) -> None:
        self._stop.set()
        try:
            call(
                self._stub.CloseSession,
                pb.CloseSessionRequest(session_id=self.session_id),
                5.0,
                self.address,
            )
        except NanodistError:
            pass  # the lease lapses on its own
        self._channel.close()

    def __enter__(self) -> BarrierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
