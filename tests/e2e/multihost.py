"""A Docker Swarm of several hosts on one machine: docker-in-docker nodes that run docker-stack.yml.

Each node is a container of docker/node.Dockerfile with its own dockerd, on a private network of
its own. Every swarm command goes to a node's engine through `docker exec`; this machine's own
engine only runs, kills and removes the node containers and their network, so its swarm state
is never touched. Everything a Swarm creates is named after its id, and close() removes it all.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tests.conftest import ROOT

NODE_IMAGE = "nanodist-node:bookworm"

# The capabilities of --privileged except CAP_SYS_RESOURCE. --privileged asks for every capability,
# and an engine whose own bounding set lacks one (CAP_SYS_RESOURCE on some CI machines) cannot start
# the container at all ("unable to apply caps"); dockerd inside runs without it. Without
# --privileged Docker mounts /sys and the cgroups read-only, which docker/node-entrypoint.sh undoes;
# --cgroupns private makes the node's own cgroup the root its containers nest under.
NODE_FLAGS = [
    "--cap-add=ALL",
    "--cap-drop=SYS_RESOURCE",
    "--security-opt=seccomp=unconfined",
    "--security-opt=apparmor=unconfined",
    "--security-opt=systempaths=unconfined",
    "--device-cgroup-rule=a *:* rwm",
    "--cgroupns=private",
    # The inner overlay2 cannot sit on the node's own overlay root; a tmpfs goes with the container.
    "--tmpfs=/var/lib/docker:exec",
]
# The node network never leaves this machine, so it need not inherit a smaller MTU from the engine's
# uplink (1400 on some clouds): a swarm overlay's VXLAN packets are 50 bytes more than its 1450.
NETWORK_MTU = "1500"
FINISHED = {"Complete", "Failed", "Shutdown", "Rejected", "Orphaned", "Remove"}

T = TypeVar("T")


class NotYet(Exception):
    """Raised by a probe of wait_until: not there yet; the message says what is seen instead."""


def wait_until(what: str, probe: Callable[[], T], timeout: float, interval: float = 1.0) -> T:
    """probe()'s value once it stops raising NotYet; TimeoutError naming `what` and the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe()
        except NotYet as not_yet:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"waited {timeout:g} s for {what}; last seen: {not_yet}") from None
        time.sleep(interval)


class Clock:
    """Progress lines stamped with the seconds since the clock started."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.began

    def __call__(self, message: str) -> None:
        print(f"[{self.now():6.1f} s] {message}", flush=True)


def docker(*args: str, timeout: float = 120, stdin: int | None = None, check: bool = True) -> str:
    """Run the docker CLI against this machine's engine; its stdout, or RuntimeError with its stderr."""
    try:
        result = subprocess.run(
            ["docker", *args], stdin=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"docker {' '.join(args)}: no answer within {timeout:g} s") from None
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class Task:
    """One line of `docker stack ps`: a task of a service, where it runs and how it is doing."""

    id: str
    service: str  # without the stack's prefix: "worker", "ps-0"
    slot: str  # "worker.2"
    node: str
    desired: str
    state: str  # the first word of CURRENT STATE: Running, Complete, Failed, ...
    since: str  # the rest of it: "3 seconds ago"
    error: str


class Swarm:
    """`size` docker-in-docker nodes on a private network; node 1 is the only manager."""

    def __init__(self, size: int, log: Callable[[str], None], node_image: str = NODE_IMAGE) -> None:
        self.id = f"ndmh-{uuid.uuid4().hex[:6]}"
        self.nodes = [f"{self.id}-{i}" for i in range(1, size + 1)]
        self.manager = self.nodes[0]
        self.node_image = node_image
        self.log = log
        self.killed: set[str] = set()

    # --- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        """Start the nodes, form the swarm over the private network, and wait until every node is Ready."""
        label = f"--label=nanodist.multihost={self.id}"
        docker("network", "create", label, f"--opt=com.docker.network.driver.mtu={NETWORK_MTU}", self.id)
        for node in self.nodes:
            names = [f"--name={node}", f"--hostname={node}", f"--network={self.id}", label]
            docker("run", "--detach", *names, *NODE_FLAGS, self.node_image)
        for node in self.nodes:
            wait_until(f"the engine in {node}", lambda n=node: self._engine_up(n), timeout, 0.5)
        self.log(f"{len(self.nodes)} node engines up: {', '.join(self.nodes)}")
        address = self.address(self.manager)
        self.engine(self.manager, "swarm", "init", "--advertise-addr", address)
        token = self.engine(self.manager, "swarm", "join-token", "-q", "worker").strip()
        for node in self.nodes[1:]:
            self.engine(node, "swarm", "join", "--token", token, f"{address}:2377")
        wait_until("every node Ready in `docker node ls`", self._all_ready, timeout)
        self.log(f"swarm formed: {self.manager} manager at {address}, {len(self.nodes) - 1} workers joined")

    def close(self) -> None:
        """Remove the nodes (their engines, containers and volumes live in them) and the network."""
        for node in self.nodes:
            docker("rm", "-f", "-v", node, check=False, timeout=120)
        docker("network", "rm", self.id, check=False)
        left = docker("ps", "-aq", "--filter", f"label=nanodist.multihost={self.id}", check=False)
        left += docker("network", "ls", "-q", "--filter", f"label=nanodist.multihost={self.id}", check=False)
        if left.strip():
            raise RuntimeError(f"swarm {self.id}: could not remove {left.split()}")
        self.log(f"removed the {len(self.nodes)} nodes and network {self.id}")

    def _engine_up(self, node: str) -> None:
        result = subprocess.run(
            ["docker", "exec", node, "docker", "info", "--format", "{{.Driver}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            state = docker("inspect", "-f", "{{.State.Status}}", node, check=False).strip()
            if state != "running":
                logs = subprocess.run(["docker", "logs", "--tail", "20", node], capture_output=True, text=True)
                raise RuntimeError(f"node {node} is {state}: {logs.stdout[-1500:]}{logs.stderr[-1500:]}")
            raise NotYet(result.stderr.strip()[-200:] or "no answer")

    def _all_ready(self) -> None:
        states = self.node_states()
        if len(states) < len(self.nodes) or any(s != "ready" for s in states.values()):
            raise NotYet(str(states))

    # --- talking to the nodes' engines ------------------------------------------------------------

    def engine(self, node: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> str:
        """`docker ARGS` run by `node`'s own engine."""
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        return docker("exec", *flags, node, "docker", *args, timeout=timeout)

    def address(self, node: str) -> str:
        return docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{self.id}").IPAddress}}}}', node).strip()

    def node_states(self) -> dict[str, str]:
        """Each node's status as the manager sees it: ready, down, unknown."""
        out = self.engine(self.manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}", timeout=30)
        return {name: status.lower() for name, status in (line.split() for line in out.splitlines())}

    def load(self, image: str) -> None:
        """Copy an image of this machine into every node: `docker save` once, `docker load` in each."""
        began = time.monotonic()
        with tempfile.NamedTemporaryFile(suffix=".tar") as archive:
            docker("save", "-o", archive.name, image, timeout=600)
            size = os.path.getsize(archive.name) / 2**20
            for node in self.nodes:
                with open(archive.name, "rb") as f:
                    docker("exec", "-i", node, "docker", "load", "-q", stdin=f.fileno(), timeout=600)
        self.log(f"loaded {image} ({size:.0f} MiB) into {len(self.nodes)} nodes in {time.monotonic() - began:.0f} s")

    def label(self, node: str, *labels: str) -> None:
        self.engine(self.manager, "node", "update", *(f"--label-add={label}=true" for label in labels), node)

    def deploy(self, stack: str, files: Iterable[str], env: Mapping[str, str]) -> None:
        """`docker stack deploy` of files of this repository, with `env` for their ${VARIABLES}."""
        args = []
        for path in files:
            target = f"/stack/{stack}/{os.path.basename(path)}"
            script = f"mkdir -p /stack/{stack} && cat > {target}"
            with open(os.path.join(ROOT, path), "rb") as f:
                docker("exec", "-i", self.manager, "sh", "-c", script, stdin=f.fileno())
            args += ["-c", target]
        self.engine(self.manager, "stack", "deploy", "--resolve-image", "never", *args, stack, env=env)

    def remove(self, stack: str, timeout: float = 120) -> None:
        """`docker stack rm`, then wait until no node runs a container of it."""
        self.engine(self.manager, "stack", "rm", stack)

        def gone() -> None:
            busy = {n: self._containers(n, stack) for n in self.nodes if n not in self.killed}
            if any(busy.values()):
                raise NotYet(str({n: len(c) for n, c in busy.items() if c}))

        wait_until(f"the containers of stack {stack} to go", gone, timeout)

    def _containers(self, node: str, stack: str) -> list[str]:
        out = self.engine(node, "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack}")
        return out.split()

    def tasks(self, stack: str) -> list[Task]:
        """Every task of the stack, the replaced ones too, newest first within a slot."""
        out = self.engine(self.manager, "stack", "ps", "--no-trunc", "--format", "{{json .}}", stack, timeout=30)
        tasks = []
        for line in out.splitlines():
            row = json.loads(line)
            slot = row["Name"].removeprefix(f"{stack}_")
            state, _, since = row["CurrentState"].partition(" ")
            tasks.append(
                Task(row["ID"], slot.split(".")[0], slot, row["Node"], row["DesiredState"], state, since, row["Error"])
            )
        return tasks

    def restart_conditions(self, stack: str) -> dict[str, str]:
        """Service (without the prefix) -> its restart condition: none for the workers, on-failure for servers."""
        names = self.engine(self.manager, "stack", "services", "--format", "{{.Name}}", stack).split()
        if not names:
            return {}
        fields = "{{.Spec.Name}} {{.Spec.TaskTemplate.RestartPolicy.Condition}}"
        out = self.engine(self.manager, "service", "inspect", "--format", fields, *names)
        pairs = (line.split() for line in out.splitlines())
        return {name.removeprefix(f"{stack}_"): condition for name, condition in pairs}

    def logs(self, stack: str, service: str, tail: int = 50, raw: bool = True) -> str:
        """The service's last lines from every node; without `raw`, each prefixed with its task and node."""
        command = ["docker", "exec", self.manager, "docker", "service", "logs", "--tail", str(tail)]
        result = subprocess.run(
            [*command, *(["--raw"] if raw else []), f"{stack}_{service}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return result.stdout + result.stderr

    def read(self, node: str, path: str) -> str | None:
        """A file inside a node (such as a volume's data), or None when it is not there."""
        result = subprocess.run(["docker", "exec", node, "cat", path], capture_output=True, text=True, check=False)
        return result.stdout if result.returncode == 0 else None

    def wait_job(self, stack: str, timeout: float, every: float = 10.0) -> list[Task]:
        """Wait until every task of the stack's workers (the services that never restart) has finished.

        Tasks on a killed node are not waited for: no engine is left to report their end. Logs a line of
        task states and the workers' latest progress line every `every` seconds; returns `docker stack ps`.
        """
        job = {service for service, condition in self.restart_conditions(stack).items() if condition == "none"}
        last_report = 0.0

        def finished() -> list[Task]:
            nonlocal last_report
            tasks = self.tasks(stack)
            current = newest(t for t in tasks if t.service in job and t.node not in self.killed)
            running = [t for t in current if t.state not in FINISHED]
            summary = ", ".join(f"{t.slot} {t.state} on {t.node}" for t in current) or "no worker tasks yet"
            if current and not running:
                return tasks
            if time.monotonic() - last_report >= every:
                last_report = time.monotonic()
                epochs = [line for line in self.logs(stack, "worker", 200).splitlines() if "] epoch " in line]
                self.log(f"{summary}" + (f"; latest: {epochs[-1].strip()}" if epochs else ""))
            raise NotYet(summary)

        return wait_until(f"the workers of stack {stack} to finish", finished, timeout, 2.0)

    def kill(self, node: str) -> None:
        """The whole host at once: its engine and every container on it. Whether its peers hear a reset of
        their connections depends on which goes first, the processes or the node's network."""
        docker("kill", node)
        self.killed.add(node)


def newest(tasks: Iterable[Task]) -> list[Task]:
    """The current task of each slot (`docker stack ps` lists a slot's newest task first)."""
    current: dict[str, Task] = {}
    for task in tasks:
        current.setdefault(task.slot, task)
    return sorted(current.values(), key=lambda t: t.slot)


def placement(tasks: Iterable[Task], down: Iterable[str] = ()) -> str:
    """A table of the current task of every slot; a task on a node in `down` is marked so (its state is stale)."""
    lost = set(down)
    rows = [("SERVICE", "TASK", "NODE", "DESIRED", "STATE", "ERROR")]
    for t in newest(tasks):
        node = f"{t.node} (down)" if t.node in lost else t.node
        rows.append((t.service, t.slot, node, t.desired, f"{t.state} {t.since}", t.error))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
