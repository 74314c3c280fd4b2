"""BarrierClient: reusable named barriers that raise BarrierBroken instead of hanging."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import grpc

from nanodist.client.base import ServiceClient, default_member_id
from nanodist.client.errors import NanodistError, NotFound, from_rpc_error
from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import ClientSecurity, trailing
from nanodist.v1 import barrier_pb2 as pb
from nanodist.v1 import barrier_pb2_grpc


class BarrierBroken(NanodistError):
    """The barrier broke (timeout, abort or a lost member); `missing` names who had not arrived.

    `code` is ABORTED, or DEADLINE_EXCEEDED for the waiter whose own timeout broke it.
    """

    def __init__(self, message: str, code: grpc.StatusCode, missing: list[str]) -> None:
        super().__init__(message, code)
        self.missing = missing


@dataclass(frozen=True)
class Released:
    generation: int
    arrival_index: int


class BarrierClient(ServiceClient):
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
        security: ClientSecurity | None = None,
    ) -> None:
        super().__init__(address, timeout=timeout, retry=retry, security=security)
        self.member_id = member_id or default_member_id()
        self._stub = barrier_pb2_grpc.BarrierStub(self._channel)
        # One key for this open, reused by every retry: if an attempt opened a
        # session but its response was lost, the retry gets that session back
        # instead of opening a second one and leaving the first to lapse (which
        # would break this member's barriers).
        request = pb.OpenSessionRequest(
            member_id=self.member_id,
            ttl_ms=int(session_ttl * 1000),
            barriers=list(barriers),
            idempotency_key=uuid.uuid4().hex,
        )
        try:
            opened = self._call(self._stub.OpenSession, request, idempotent=True)
        except BaseException:
            self._channel.close()
            raise
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
                self._call(
                    self._stub.KeepAlive, pb.KeepAliveSessionRequest(session_id=self.session_id), timeout=interval
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
                message = error.details() or error.code().name
                raise BarrierBroken(message, error.code(), [m for m in missing.split(",") if m]) from None
            raise from_rpc_error(error, self.address) from None
        return Released(response.generation, response.arrival_index)

    def abort(self, name: str, reason: str = "") -> int:
        request = pb.AbortRequest(name=name, member_id=self.member_id, reason=reason)
        return self._call(self._stub.Abort, request).generation

    def reset(self, name: str) -> int:
        return self._call(self._stub.Reset, pb.ResetRequest(name=name)).generation

    def status(self, name: str = "") -> list[pb.BarrierState]:
        return list(self._call(self._stub.Status, pb.BarrierStatusRequest(name=name), idempotent=True).barriers)

    def close(self) -> None:
        """End the session (the member's barriers do not break) and the channel."""
        self._stop.set()
        try:
            self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=self.session_id), timeout=5.0)
        except NanodistError:
            pass  # the lease lapses on its own
        super().close()
