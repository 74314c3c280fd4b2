"""docker-stack.yml (Swarm) stays in step with docker-compose.yml: the same services, image, commands,
environment and state, with what each orchestrator needs of its own; the same for the TLS variants.
Neither waits on health through the orchestrator: the workers do it themselves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE_ONLY = {"runs-dir", "tls-files"}  # one-shots for bind mounts, which a swarm does not need
SERVERS = {"ps-0", "ps-1", "barrier", "lock"}
WORKERS = {"worker", "mpi-group"}
SAME = ("image", "command", "entrypoint", "healthcheck")
SECRET_OWNER = "10001"  # the image's user
PUBLISH_ADDRESS = "${NANODIST_PUBLISH_ADDRESS:-127.0.0.1}"  # compose's host interface for published ports


def load(name: str) -> dict:
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


def services(name: str) -> dict[str, dict]:
    return load(name)["services"]


def ports(service: dict) -> set[tuple[str, int]]:
    """(published, target) of each port, in either syntax, before interpolation."""
    found = set()
    for port in service.get("ports", []):
        if isinstance(port, str):
            published, _, target = port.removeprefix(PUBLISH_ADDRESS + ":").rpartition(":")
            found.add((published, int(target)))
        else:
            found.add((str(port["published"]), int(port["target"])))
    return found


def targets(service: dict) -> dict[str, str]:
    """mount path -> source, of each volume in short syntax ("source:path[:ro]"; a source may hold ":-")."""
    found = {}
    for volume in service.get("volumes", []):
        volume = volume.removesuffix(":ro").removesuffix(":rw")
        source, _, path = volume.rpartition(":")
        found[path] = source
    return found


def test_the_stack_runs_the_services_of_the_compose_file_the_same_way():
    compose, stack = services("docker-compose.yml"), services("docker-stack.yml")
    assert set(stack) == set(compose) - COMPOSE_ONLY == SERVERS | WORKERS
    for name, service in stack.items():
        for key in SAME:
            if (name, key) != ("worker", "command"):
                assert service.get(key) == compose[name].get(key), (name, key)
        assert ports(service) == ports(compose[name]), name
        assert targets(service).keys() == targets(compose[name]).keys(), name
    for name in WORKERS:
        ours, theirs = stack[name]["environment"], compose[name]["environment"]
        # The run's default name differs, so that the two leave their metrics apart; only compose's TCP
        # group (--scale worker=N) closes after a join window.
        assert {k: v for k, v in ours.items() if k != "NANODIST_RUN_ID"} == {
            k: v for k, v in theirs.items() if k not in ("NANODIST_RUN_ID", "NANODIST_JOIN_WINDOW")
        }
        assert ours["NANODIST_RUN_ID"].startswith("${NANODIST_RUN_ID:-")
    # The stack's TCP group is as large as its replicas, and waits for a late one; compose's takes
    # whoever joins within the window.
    assert stack["worker"]["deploy"]["replicas"] == "${NANODIST_WORKERS:-3}"
    group_size = stack["worker"]["command"].index("--group-size") + 1
    assert stack["worker"]["command"][group_size] == "${NANODIST_WORKERS:-3}"
    same_but_size = [*stack["worker"]["command"][:group_size], "0", *stack["worker"]["command"][group_size + 1 :]]
    assert compose["worker"]["command"] == same_but_size


def test_compose_publishes_every_port_on_loopback_unless_told_otherwise():
    published = [port for service in services("docker-compose.yml").values() for port in service.get("ports", [])]
    assert published and all(port.startswith(PUBLISH_ADDRESS + ":") for port in published), published


def test_servers_restart_on_failure_and_workers_never():
    compose, stack = services("docker-compose.yml"), services("docker-stack.yml")
    for name in SERVERS:
        assert compose[name]["restart"] == "on-failure", name
        assert stack[name]["deploy"]["restart_policy"]["condition"] == "on-failure", name
    for name in WORKERS:
        assert compose[name].get("restart", "no") == "no", name
        assert compose[name]["deploy"]["restart_policy"]["condition"] == "none", name
        assert stack[name]["deploy"]["restart_policy"]["condition"] == "none", name


def test_state_is_on_named_volumes_pinned_by_the_node_labels_that_make_stack_up_sets():
    compose, stack = services("docker-compose.yml"), services("docker-stack.yml")
    volumes = load("docker-stack.yml")["volumes"]
    labels = set()
    for name, service in stack.items():
        for path, source in targets(service).items():
            assert source in volumes, (name, path)  # no bind mount: a swarm node has no ./runs
            if name in SERVERS:
                assert targets(compose[name])[path] == source, name  # the same state, in the same volume
                (constraint,) = service["deploy"]["placement"]["constraints"]
                label = re.fullmatch(r"node\.labels\.(\S+) == true", constraint)
                assert label, constraint
                labels.add(label.group(1))
    assert {name for name in SERVERS if targets(stack[name])} == {"ps-0", "ps-1", "lock"}
    with open(os.path.join(ROOT, "Makefile")) as f:
        made = re.search(r"^STATE_LABELS := (.*)$", f.read(), re.M)
    assert made and set(made.group(1).split()) == labels


def test_no_orchestrator_waits_on_health_for_the_workers():
    for name in ("docker-compose.yml", "docker-compose.tls.yml", "docker-stack.yml", "docker-stack.tls.yml"):
        with open(os.path.join(ROOT, name)) as f:
            assert "service_healthy" not in f.read(), name
    for file in ("docker-compose.yml", "docker-compose.tls.yml"):
        for name, service in services(file).items():
            assert set(service.get("depends_on", {})) <= COMPOSE_ONLY, (file, name)
    for name, service in services("docker-stack.yml").items():
        assert "depends_on" not in service, name


def test_the_tls_stack_gives_the_variables_of_the_compose_tls_file_as_secrets_of_the_image_user():
    compose, stack = services("docker-compose.tls.yml"), services("docker-stack.tls.yml")
    declared = load("docker-stack.tls.yml")["secrets"]
    assert set(stack) == set(compose) - COMPOSE_ONLY
    for name, service in stack.items():
        ours, theirs = service["environment"], compose[name]["environment"]
        assert ours.keys() == theirs.keys(), name
        given = {s["source"]: s for s in service["secrets"]}
        for variable, path in ours.items():
            directory, file = os.path.split(path)
            assert (directory, file) == ("/run/secrets", os.path.basename(theirs[variable])), (name, variable)
            assert (given[file]["uid"], given[file]["mode"]) == (SECRET_OWNER, 0o400), (name, file)
        assert given.keys() <= declared.keys()
    for name, secret in declared.items():
        assert secret["file"] == "${NANODIST_CERTS_DIR:-./certs}/" + name  # as `make certs` writes them


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI parses stack files")
@pytest.mark.parametrize(
    "files",
    [["docker-stack.yml"], ["docker-stack.yml", "docker-stack.tls.yml"], ["docker-stack.yml", "docker-stack.ha.yml"]],
)
def test_docker_stack_accepts_the_files(files):
    # `docker stack config` runs the loader of `docker stack deploy` without a swarm.
    args = [arg for f in files for arg in ("-c", f)]
    result = subprocess.run(
        ["docker", "stack", "config", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    if "unknown command" in result.stderr or "is not a docker command" in result.stderr:
        pytest.skip("this docker CLI has no `docker stack config`")
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    if "docker-stack.ha.yml" in files:  # the override's commands replace the shards', its variables win
        assert merged["worker"]["environment"]["NANODIST_PS"] == "ps-0:50051+ps-0-b:50051,ps-1:50051+ps-1-b:50051"
        assert "--checkpoint-dir" not in merged["ps-0"]["command"]
    else:
        assert merged["worker"]["environment"]["NANODIST_PS"] == "ps-0:50051,ps-1:50051"


@pytest.mark.parametrize("file", ["docker-compose.ha.yml", "docker-stack.ha.yml"])
def test_the_ha_files_keep_the_coordination_state_on_three_etcd_members_with_two_replicas_each(file):
    ha = services(file)
    members = [f"etcd-{i}" for i in range(3)]
    cluster = ",".join(f"{m}=http://{m}:2380" for m in members)
    for member in members:
        flags = dict(str(word).split("=", 1) for word in ha[member]["entrypoint"][1:])
        assert ha[member]["entrypoint"][0] == "etcd" and flags["--name"] == member
        assert flags["--initial-cluster"] == cluster
        assert flags["--advertise-client-urls"] == f"http://{member}:2379"
        assert under_volume(flags["--data-dir"], ha[member]), member  # its data outlives the container
        if file == "docker-stack.ha.yml":  # pinned to its labelled node, where its volume is
            assert ha[member]["deploy"]["placement"]["constraints"] == [f"node.labels.nanodist.{member} == true"]
    store = "etcd://" + ",".join(f"{m}:2379" for m in members)
    for name in ("lock", "barrier"):
        assert ha[name]["environment"]["NANODIST_STORE"] == store, name
        assert "--state-dir" not in ha[name].get("command", []), name
    if file == "docker-compose.ha.yml":  # compose has no replicas of a name: a second service of each
        for name, port in (("lock", "50071"), ("barrier", "50061")):
            assert ha[f"{name}-2"]["environment"]["NANODIST_STORE"] == store
            variable = f"NANODIST_{name.upper()}_ADDRESS"
            for workers in ("worker", "mpi-group"):
                assert ha[workers]["environment"][variable] == f"{name}:{port},{name}-2:{port}"
    else:  # a swarm's name resolves to every replica (dnsrr), each on a node of its own
        for name in ("lock", "barrier"):
            assert ha[name]["deploy"]["replicas"] == 2 and ha[name]["deploy"]["placement"]["max_replicas_per_node"] == 1
    # Each shard is a replica set of two that elects its primary on the lock service the workers use, keeps
    # nothing on disk, and is reached at each replica's own name; the workers name both, shard by shard.
    base = services(file.replace(".ha", ""))
    workers = {**base["worker"]["environment"], **ha["worker"]["environment"]}
    shards = []
    for shard in ("ps-0", "ps-1"):
        advertised = []
        for name in (shard, f"{shard}-b"):
            command = [str(word) for word in ha[name]["command"]]
            assert option(command, "--replica-set") == f"shard-{shard[-1]}", name
            assert option(command, "--advertise") == f"{name}:{option(command, '--port')}", name
            assert option(command, "--coordinator") == workers["NANODIST_LOCK_ADDRESS"], name
            assert option(command, "--durability") == "none" and "--checkpoint-dir" not in command, name
            service = {**base.get(name, {}), **ha[name]}  # the override's keys over the base file's
            # A deposed primary exits to rejoin as a backup: the orchestrator must start it again.
            assert (service.get("restart") or service["deploy"]["restart_policy"]["condition"]) == "on-failure", name
            assert service["healthcheck"]["test"] == ["CMD", "nanodist", "health", "127.0.0.1:50051"], name
            advertised.append(option(command, "--advertise"))
        shards.append("+".join(advertised))
    for name in ("worker", "mpi-group"):
        assert ha[name]["environment"]["NANODIST_PS"] == ",".join(shards), name


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def under_volume(path: str, service: dict) -> bool:
    return any(os.path.commonpath([path, mount]) == mount for mount in targets(service))
