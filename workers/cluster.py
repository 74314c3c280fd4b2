"""The child processes of `nanodist up` and `nanodist run`: servers on ports they bind themselves,
workers, their output forwarded under a prefix, replicas started again when they exit, all stopped
together."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanodist.ports import PortFileTimeout, read_port_file
from nanodist.workers.rank_output import PREFIX_VARIABLE, RANK_PREFIXED


class LaunchError(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    server: bool
    argv: list[str]
    env: dict[str, str]
    replica: bool = False  # one of several replicas of a service: the others serve while it restarts


class Cluster:
    """Child processes with their output forwarded under a prefix; stopped together.

    watch_for: a pattern of output lines that report a failure; the first one
    seen is named when a child fails (a rank inside an mpiexec group, say).
    """

    def __init__(self, watch_for: re.Pattern[str] | None = None) -> None:
        self.children: list[Child] = []
        self.output_lock = threading.Lock()
        self.watch_for = watch_for
        self.first_failure: str | None = None
        self._scratch: str | None = None  # the servers' port files
        self._streams: list[threading.Thread] = []  # one per child process, forwarding its output

    def serve(self, name: str, role: str, args: list[str], timeout: float, replica: bool = False) -> str:
        """Start `nanodist serve ROLE` on a port it binds itself (so that no other process holds it);
        return its address once it is healthy. A replica that exits is started again on that port."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix="nanodist-ports-")
        port_file = os.path.join(self._scratch, f"{name}.port")
        child = self.spawn(
            name, nanodist_argv("serve", role, "--port", "0", "--port-file", port_file, *args), server=True
        )
        try:
            port = read_port_file(port_file, child.process.poll, timeout, name)
        except PortFileTimeout as error:
            raise LaunchError(str(error)) from None
        address = f"127.0.0.1:{port}"
        self.wait_healthy(child, address, timeout)
        child.replica, child.argv = replica, nanodist_argv("serve", role, "--port", str(port), *args)
        return address

    def restarted_replica(self, child: Child, code: int) -> bool:
        """Start a replica that exited again, saying so; False for any other server, whose exit ends the job."""
        if not child.replica:
            return False
        print(f"nanodist: {child.name} exited with status {code}; starting it again (the others serve)", flush=True)
        self.restart(child)
        return True

    def spawn(self, name: str, argv: list[str], server: bool = False, env: dict[str, str] | None = None) -> Child:
        """Start `argv` with the caller's environment plus `env`."""
        merged = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        child = Child(name, self._start(argv, merged), server, argv, merged)
        self.children.append(child)
        self._forward(child)
        return child

    def _forward(self, child: Child) -> None:
        thread = threading.Thread(target=self._stream, args=(child,), daemon=True)
        thread.start()
        self._streams.append(thread)

    @staticmethod
    def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )  # its own process group, so stop() reaches mpiexec's ranks

    def restart(self, child: Child) -> None:
        """Start a child that exited again, with the same command and environment."""
        _signal_group(child.process, signal.SIGKILL)  # what is left of it: an MPI group's other ranks
        child.process = self._start(child.argv, child.env)
        self._forward(child)

    def _stream(self, child: Child) -> None:
        assert child.process.stdout is not None
        own_prefix = bool(child.env.get(PREFIX_VARIABLE))
        for line in child.process.stdout:
            with self.output_lock:
                found = self.watch_for.search(line) if self.watch_for is not None else None
                if found is not None and self.first_failure is None:
                    self.first_failure = line[found.start() :].strip()
                own = own_prefix and RANK_PREFIXED.match(line) is not None  # a worker that prefixes its own lines
                print(line if own else f"[{child.name}] {line}", end="", flush=True)

    def wait_healthy(self, child: Child, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if child.process.poll() is not None:
                    raise LaunchError(f"{child.name} exited with {child.process.returncode} while starting")
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise LaunchError(f"{child.name} at {address} not healthy after {timeout:g}s")

    def watch_workers(self) -> None:
        """Return when every worker exited 0; raise naming the first child that failed."""
        while True:
            for child in self.children:
                code = child.process.poll()
                if child.server and code is not None and self.restarted_replica(child, code):
                    continue
                if code is not None and (code != 0 or child.server):
                    time.sleep(0.2)  # let the output threads catch the children's last lines
                    exited = f"{child.name} exited with status {code}"
                    raise LaunchError(f"{self.first_failure} (then {exited})" if self.first_failure else exited)
            if all(c.process.poll() == 0 for c in self.children if not c.server):
                return
            time.sleep(0.1)

    def watch_elastic_workers(self, max_restarts: int = 0) -> None:
        """An elastic group goes on without a worker that fails: report each (and start it again while
        restarts are left: it rejoins at the next generation), and return once every worker has
        exited, if one at least finished; else raise naming the first failure."""
        reported: set[int] = set()  # processes whose failure was reported
        restarts = 0
        while True:
            for child in self.children:
                code = child.process.poll()
                if child.server and code is not None and not self.restarted_replica(child, code):
                    raise LaunchError(f"{child.name} exited with status {code}")
                if child.server or code in (None, 0) or child.process.pid in reported:
                    continue
                reported.add(child.process.pid)
                if restarts < max_restarts:
                    restarts += 1
                    print(
                        f"nanodist: {child.name} exited with status {code}; "
                        f"starting it again (restart {restarts} of {max_restarts})",
                        flush=True,
                    )
                    self.restart(child)
                else:
                    print(f"nanodist: {child.name} exited with status {code}; the others go on", flush=True)
            workers = [c.process.poll() for c in self.children if not c.server]
            if workers and all(code is not None for code in workers):
                if 0 in workers:
                    return
                time.sleep(0.2)  # let the output threads catch the children's last lines
                raise LaunchError(f"every worker failed; the first: {self.first_failure or 'see above'}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM every process group, then SIGKILL what is left: no orphans."""
        for child in reversed(self.children):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(child.process, signal.SIGKILL)  # any rank mpiexec left behind
            child.process.wait()
        # A forwarding thread still printing when the interpreter exits holds stdout's lock, and Python
        # aborts (SIGABRT) instead of exiting with the launcher's status: let them finish first.
        for thread in self._streams:
            thread.join(timeout=5)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


def _signal_group(process: subprocess.Popen[str], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def nanodist_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanodist.workers.cli", *args]
