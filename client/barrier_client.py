"""BarrierClient: reusable named barriers that raise BarrierBroken instead of hanging."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import grpc

from nanodist.client.base import ServiceClient, default_member_id
from nanodist.client.errors import NanodistError, from_rpc_error
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


class _SessionReplaced(Exception):
    """A wait found its session gone and opened a new one; it is sent again under that one."""

    def __init__(self, error: NanodistError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class Released:
    generation: int
    arrival_index: int


class BarrierClient(ServiceClient):
    """A member of one or more barriers, with a heartbeat session.

    The session is renewed in a background thread every ttl/3; if this process
    dies, the lease lapses and every barrier it belongs to breaks, naming it.

    The barrier service keeps its state in memory. When it restarts, this
    client opens a new session as soon as the service no longer knows the old
    one, and a wait in progress is sent again (UNAVAILABLE is retried within
    the wait's timeout), so its generation forms again from the members that
    wait again.
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
        self._session_ttl_ms = int(session_ttl * 1000)
        self._barriers = list(barriers)
        self._reopening = threading.Lock()  # the heartbeat and a wait may both find the session gone
        # The error that ended the last session this client had to replace (a lapse, or a restart of the
        # service); the member must assume the barriers it was waiting at broke then.
        self.session_lost: NanodistError | None = None
        self.renewed_at = time.monotonic()  # when the service last confirmed this member's session
        self._gone: tuple[str, NanodistError] | None = None  # a session the service no longer knows
        try:
            self.session_id, ttl_ms = self._open_session()
        except BaseException:
            self._channel.close()
            raise
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._keep_alive,
            args=(ttl_ms / 3000,),
            name=f"barrier-session-{self.member_id}",
            daemon=True,
        )
        self._heartbeat.start()

    def _open_session(self) -> tuple[str, int]:
        # One key for this open, reused by every retry: if an attempt opened a
        # session but its response was lost, the retry gets that session back
        # instead of opening a second one and leaving the first to lapse (which
        # would break this member's barriers).
        request = pb.OpenSessionRequest(
            member_id=self.member_id,
            ttl_ms=self._session_ttl_ms,
            barriers=self._barriers,
            idempotency_key=uuid.uuid4().hex,
        )
        opened = self._call(self._stub.OpenSession, request, idempotent=True)
        self.renewed_at = time.monotonic()
        return opened.session_id, opened.ttl_ms

    def _replace_session(self, gone: str, error: NanodistError) -> bool:
        """Open a new session in place of `gone`, which the service no longer knows, unless another
        thread did already or the client is closing; whether the session is now another one."""
        with self._reopening:
            if self.session_id == gone and not self._stop.is_set():
                self.session_id = self._open_session()[0]
                self.session_lost = error
            return self.session_id != gone

    def _keep_alive(self, interval: float) -> None:
        """Send a KeepAlive every interval, without waiting for the last one's answer: a loaded service
        that answers late still renews on time, as each call renews the lease when it reaches it."""
        while not self._stop.wait(interval):
            gone, self._gone = self._gone, None
            if gone is not None:
                try:
                    self._replace_session(*gone)
                except NanodistError:
                    continue  # the service is away; the next beat tries again
            session, sent_at = self.session_id, time.monotonic()
            request = pb.KeepAliveSessionRequest(session_id=session)
            future = self._stub.KeepAlive.future(request, timeout=3 * interval)  # the service's TTL
            future.add_done_callback(lambda answer, s=session, t=sent_at: self._answered(answer, s, t))

    def _answered(self, answer: grpc.Future, session: str, sent_at: float) -> None:
        """A KeepAlive's answer, on gRPC's thread: a renewal counts from when it was sent (the service
        renewed later than that); NOT_FOUND (lapsed, or the service restarted) is the beat's to mend."""
        if answer.cancelled():
            return
        error = answer.exception()
        if error is None:
            self.renewed_at = max(self.renewed_at, sent_at)
        elif isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.NOT_FOUND:
            self._gone = (session, from_rpc_error(error, self.address))

    def wait(self, name: str, parties: int, timeout: float | None = None) -> Released:
        """Block until `parties` members arrive; raise BarrierBroken naming the missing ones."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        request_id = uuid.uuid4().hex  # its retries are this arrival, even after its generation released

        def attempt() -> pb.WaitResponse:
            session = self.session_id
            left = max(0.001, deadline - time.monotonic())  # a retry waits only for what is left
            request = pb.WaitRequest(
                name=name,
                parties=parties,
                member_id=self.member_id,
                timeout_ms=int(left * 1000) or 1,
                session_id=session,
                request_id=request_id,
            )
            try:
                return self._stub.Wait(request, timeout=left + 10)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                # The session is unknown: the service restarted (or the session lapsed, which broke
                # this member's barriers). Wait again under a new session.
                lost = from_rpc_error(error, self.address)
                if not self._replace_session(session, lost):
                    raise lost from None
                raise _SessionReplaced(lost) from None

        while True:
            try:
                response = self._within(deadline - time.monotonic()).call(attempt)
                return Released(response.generation, response.arrival_index)
            except _SessionReplaced as replaced:
                if time.monotonic() >= deadline:
                    raise replaced.error from None
            except grpc.RpcError as error:
                missing = trailing(error, "nanodist-missing")
                if missing is not None:
                    message = error.details() or error.code().name
                    raise BarrierBroken(message, error.code(), [m for m in missing.split(",") if m]) from None
                raise from_rpc_error(error, self.address) from None

    def abort(self, name: str, reason: str = "") -> int:
        request = pb.AbortRequest(name=name, member_id=self.member_id, reason=reason)
        return self._call(self._stub.Abort, request, idempotent=True).generation  # a broken barrier stays broken

    def reset(self, name: str) -> int:
        return self._call(self._stub.Reset, pb.ResetRequest(name=name)).generation

    def status(self, name: str = "", timeout: float | None = None) -> list[pb.BarrierState]:
        request = pb.BarrierStatusRequest(name=name)
        return list(self._call(self._stub.Status, request, timeout=timeout, idempotent=True).barriers)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    @property
    def unrenewed_for(self) -> float:
        """Seconds since the service last renewed this member's session: past the TTL, it has lapsed."""
        return time.monotonic() - self.renewed_at

    def close(self) -> None:
        """End the session (the member's barriers do not break) and the channel; again: nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._reopening:  # a session being replaced now is the one closed; none is opened after
            session = self.session_id
        try:
            self._call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=session), timeout=5.0)
        except NanodistError:
            pass  # the lease lapses on its own
        super().close()
