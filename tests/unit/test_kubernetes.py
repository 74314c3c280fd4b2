"""deploy/kubernetes, rendered by `kubectl kustomize` (no cluster needed): every object of every
overlay valid against a pinned Kubernetes version's schemas, strictly (kubernetes-validate ships
them), and checked for what a cluster would only reveal at run time: the image, Service ports against
container ports, gRPC health probes, restart policies, volumes under the state the servers write,
resources and a locked-down security context, the NetworkPolicy, and every variable the workers need,
agreeing with the servers they name and with docker-compose.yml."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tomllib
from collections.abc import Iterator

import kubernetes_validate
import pytest
import yaml

from nanodist.workers.config import SecurityFlags, TrainConfig
from nanodist.workers.settings import declared
from tests.conftest import ROOT

PLAINTEXT = "deploy/kubernetes/overlays/plaintext"
TLS = "deploy/kubernetes/overlays/tls"
HA = "deploy/kubernetes/overlays/ha"
OVERLAYS = [PLAINTEXT, TLS, HA]
KUBERNETES = "1.37.0"  # the version whose schemas the rendered objects must satisfy
WORKLOADS = ("StatefulSet", "Deployment", "Job")
# What a worker cannot start without (the rest of TrainConfig has defaults that suit a cluster).
REQUIRED = {
    "NANODIST_PS",
    "NANODIST_BARRIER_ADDRESS",
    "NANODIST_LOCK_ADDRESS",
    "NANODIST_RUN_ID",
    "NANODIST_RUNS_DIR",
    "NANODIST_NUM_GROUPS",
    "NANODIST_MODE",
}
RANK = "NANODIST_RANK"  # the TCP backend's own variable: a worker's rank in its group
TLS_FILES = {
    "NANODIST_TLS_CERT",
    "NANODIST_TLS_KEY",
    "NANODIST_TLS_CLIENT_CA",
    "NANODIST_AUTH_TOKEN_FILE",
    "NANODIST_TLS_CA",
    "NANODIST_TLS_CLIENT_CERT",
    "NANODIST_TLS_CLIENT_KEY",
}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) renders the files")


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", path], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def of_kind(docs: tuple[dict, ...], *kinds: str) -> list[dict]:
    return [d for d in docs if d["kind"] in kinds]


def named(docs: tuple[dict, ...], kind: str, name: str) -> dict:
    (found,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def role(docs: tuple[dict, ...], component: str) -> list[dict]:
    """The workloads whose pods are servers, or workers (app.kubernetes.io/component)."""
    return [w for w in of_kind(docs, *WORKLOADS) if template_labels(w)["app.kubernetes.io/component"] == component]


def template_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    return pod(workload)["containers"] + pod(workload).get("initContainers", [])


def argv(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def flag(container: dict, name: str) -> str:
    words = argv(container)
    return words[words.index(name) + 1]


def environment(docs: tuple[dict, ...], container: dict) -> dict[str, str | None]:
    """The container's variables: its ConfigMaps' entries, then its own env (None for a field reference)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])  # a KeyError names a ConfigMap that is not rendered
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "configMapKeyRef" in variable["valueFrom"]:
            ref = variable["valueFrom"]["configMapKeyRef"]
            env[variable["name"]] = maps[ref["name"]][ref["key"]]
        else:
            env[variable["name"]] = None
    return env


def mounts(workload: dict, container: dict) -> Iterator[tuple[str, dict]]:
    """(mount path, the volume or claim template mounted there) for each of the container's mounts."""
    volumes = {v["name"]: v for v in pod(workload).get("volumes", [])}
    claims = {c["metadata"]["name"]: {"claim": c} for c in workload["spec"].get("volumeClaimTemplates", [])}
    for mount in container.get("volumeMounts", []):
        yield mount["mountPath"], {**volumes, **claims}[mount["name"]]


def under(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_container_runs_the_nanodist_image_as_its_non_root_user(path):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        image = f"nanodist:{tomllib.load(f)['project']['version']}"
    workloads = of_kind(render(path), *WORKLOADS)
    shards = {"ps-0", "ps-1"} if path == HA else {"ps"}  # HA: a StatefulSet per shard, of its replicas
    expected = shards | {"barrier", "lock", "worker", "mpi-group"} | ({"etcd"} if path == HA else set())
    assert {w["metadata"]["name"] for w in workloads} == expected
    for w in workloads:
        for c in containers(w):
            # IfNotPresent: an image loaded into the nodes (kind load, ctr import) is used as it is.
            assert (c["image"], c["imagePullPolicy"]) == (image, "IfNotPresent"), w["metadata"]["name"]
        assert pod(w)["securityContext"]["runAsUser"] == 10001  # the image's user, who owns its state folders


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_service_is_headless_and_its_ports_reach_container_ports(path):
    docs = render(path)
    for service in of_kind(docs, "Service"):
        name, spec = service["metadata"]["name"], service["spec"]
        assert spec["clusterIP"] == "None", name  # clients reach each server itself, as under compose and swarm
        selected = [w for w in of_kind(docs, *WORKLOADS) if spec["selector"].items() <= template_labels(w).items()]
        assert len(selected) == 1, name
        ports = [p for c in containers(selected[0]) for p in c.get("ports", [])]
        for port in spec["ports"]:
            target = port.get("targetPort", port["port"])
            matching = [p for p in ports if target in (p.get("name"), p["containerPort"])]
            assert matching and matching[0]["containerPort"] == port["port"], f"{name}: port {port}"


def test_the_servers_restart_and_are_probed_with_grpc_health():
    for w in role(render(PLAINTEXT), "server"):
        assert w["kind"] in ("StatefulSet", "Deployment") and pod(w).get("restartPolicy", "Always") == "Always"
        assert w["spec"]["replicas"] >= 1
        (c,) = containers(w)
        port = int(flag(c, "--port"))
        assert port in [p["containerPort"] for p in c["ports"]]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (w["metadata"]["name"], probe)


def test_with_tls_the_servers_are_probed_by_the_health_command_with_the_client_certificate():
    docs = render(TLS)
    for w in role(docs, "server"):
        (c,) = containers(w)
        command = ["nanodist", "health", f"127.0.0.1:{flag(c, '--port')}"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert set(c[probe]) >= {"exec", "periodSeconds"} and "grpc" not in c[probe]
            assert c[probe]["exec"]["command"] == command
        assert {"NANODIST_TLS_CA", "NANODIST_TLS_CLIENT_CERT", "NANODIST_TLS_CLIENT_KEY"} <= environment(docs, c).keys()


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_tls_file_is_an_item_of_the_secret_mounted_read_only(path):
    docs = render(path)
    for w in of_kind(docs, *WORKLOADS):
        for c in containers(w):
            env = environment(docs, c)
            files = {name: env[name] for name in TLS_FILES & env.keys()}
            assert bool(files) == (path == TLS), w["metadata"]["name"]
            secrets = {m: v["secret"] for m, v in mounts(w, c) if "secret" in v}
            for name, file in files.items():
                assert file is not None
                directory, item = os.path.split(file)
                assert item in [i["path"] for i in secrets[directory]["items"]], (w["metadata"]["name"], name)
                assert secrets[directory]["secretName"] == "nanodist-tls"


def test_the_shards_and_the_lock_service_keep_their_state_on_claimed_volumes():
    docs = render(PLAINTEXT)
    for name, state_flags in (("ps", ("--checkpoint-dir",)), ("lock", ("--state-dir",))):
        w = named(docs, "StatefulSet", name)
        (c,) = containers(w)
        claimed = [path for path, volume in mounts(w, c) if "claim" in volume]
        for state_flag in state_flags:
            assert any(under(flag(c, state_flag), path) for path in claimed), (name, state_flag)
    (ps,) = containers(named(docs, "StatefulSet", "ps"))
    assert flag(ps, "--durability") == "wal"  # a restarted shard loses no acknowledged push


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_workers_have_every_variable_they_need_and_no_unknown_one(path):
    docs = render(path)
    known = {d.setting.variable for cls in (TrainConfig, SecurityFlags) for d in declared(cls)} | {RANK}
    for w in role(docs, "worker"):
        assert w["kind"] == "Job" and w["spec"]["backoffLimit"] == 0 and pod(w)["restartPolicy"] == "Never"
        (c,) = containers(w)
        env = environment(docs, c)
        assert REQUIRED <= env.keys(), (w["metadata"]["name"], REQUIRED - env.keys())
        named_variables = {v for v in env if v.startswith("NANODIST_")}
        assert named_variables <= known, named_variables - known
        assert any(under(str(env["NANODIST_RUNS_DIR"]), p) for p, _ in mounts(w, c))


def test_the_workers_name_the_servers_and_groups_that_the_manifests_run():
    docs = render(PLAINTEXT)
    ps, servers = named(docs, "StatefulSet", "ps"), {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    workers = role(docs, "worker")
    env = environment(docs, containers(workers[0])[0])
    grpc_port = {
        name: next(p["port"] for p in s["spec"]["ports"] if p["name"] == "grpc") for name, s in servers.items()
    }
    shards = [f"ps-{i}.{ps['spec']['serviceName']}:{grpc_port['ps']}" for i in range(ps["spec"]["replicas"])]
    assert env["NANODIST_PS"] == ",".join(shards)  # each shard by its StatefulSet name, in order
    assert env["NANODIST_BARRIER_ADDRESS"] == f"barrier:{grpc_port['barrier']}"
    assert env["NANODIST_LOCK_ADDRESS"] == f"lock:{grpc_port['lock']}"
    # Every group, once; and the shards count one push per group in a BSP step, in the workers' mode.
    groups = sorted(int(flag(containers(w)[0], "--group-id")) for w in workers)
    assert groups == list(range(int(str(env["NANODIST_NUM_GROUPS"]))))
    (server,) = containers(ps)
    server_env = environment(docs, server)
    assert server_env["NANODIST_NUM_WORKERS"] == env["NANODIST_NUM_GROUPS"]
    assert (server_env["NANODIST_MODE"], server_env["NANODIST_STALENESS"]) == (
        env["NANODIST_MODE"],
        env["NANODIST_STALENESS"],
    )


def test_the_tcp_group_is_an_indexed_job_whose_index_is_the_rank_and_mpiexec_runs_the_mpi_group():
    docs = render(PLAINTEXT)
    tcp = named(docs, "Job", "worker")
    (c,) = containers(tcp)
    size = int(flag(c, "--group-size"))
    assert (flag(c, "--backend"), tcp["spec"]["completionMode"]) == ("tcp", "Indexed")
    assert tcp["spec"]["completions"] == tcp["spec"]["parallelism"] == size
    (rank,) = [v for v in c["env"] if v["name"] == RANK]
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == index
    (mpi,) = containers(named(docs, "Job", "mpi-group"))
    assert argv(mpi)[:3] == ["mpiexec", "-n", flag(mpi, "--group-size")] and flag(mpi, "--backend") == "mpi"


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_rendered_object_is_valid_for_the_pinned_kubernetes_version(path):
    docs = render(path)
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Service", "StatefulSet", "Deployment", "Job", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises, naming the field, if not


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_container_has_resources_and_can_gain_no_privilege(path):
    for w in of_kind(render(path), *WORKLOADS):
        name = w["metadata"]["name"]
        assert pod(w)["securityContext"]["runAsNonRoot"] is True, name
        assert pod(w)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in containers(w):
            assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, name
            assert "memory" in c["resources"]["limits"], name
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_only_workers_and_operators_reach_the_servers():
    docs = render(TLS)
    (policy,) = of_kind(docs, "NetworkPolicy")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    servers = role(docs, "server")
    assert all(selected.items() <= template_labels(w).items() for w in servers)
    assert not any(selected.items() <= template_labels(w).items() for w in role(docs, "worker"))
    (grpc_rule, metrics_rule) = policy["spec"]["ingress"]
    admitted = [peer["podSelector"]["matchLabels"] for peer in grpc_rule["from"]]
    assert admitted == [{"app.kubernetes.io/component": "worker"}, {"nanodist.io/operator": "true"}]
    assert grpc_rule["ports"] == [{"protocol": "TCP", "port": "grpc"}, {"protocol": "TCP", "port": "lane"}]
    assert metrics_rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    for w in servers:  # the named port the policy opens is each server's gRPC port
        assert [p["name"] for p in containers(w)[0]["ports"]][0] == "grpc"
    (shards,) = [w for w in servers if w["metadata"]["name"] == "ps"]  # and the shards' tensor lane
    lane = {p["name"]: p["containerPort"] for p in containers(shards)[0]["ports"]}["lane"]
    args = containers(shards)[0]["args"]
    assert args[args.index("--lane-port") + 1] == str(lane)
    for w in role(docs, "worker"):
        labels = template_labels(w)
        assert any(peer.items() <= labels.items() for peer in admitted), w["metadata"]["name"]


def test_the_servers_and_workers_run_as_in_docker_compose():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)["services"]
    docs = render(PLAINTEXT)
    same_flags = ("--port", "--metrics-port", "--checkpoint-dir", "--state-dir", "--backend", "--group-id")
    for name, workload in (("ps-0", "ps"), ("barrier", "barrier"), ("lock", "lock"), ("worker", "worker")):
        (c,) = containers(next(w for w in of_kind(docs, *WORKLOADS) if w["metadata"]["name"] == workload))
        theirs = [str(word) for word in compose[name]["command"]]
        assert argv(c)[:2] == theirs[:2], name  # the same subcommand
        for option in same_flags:
            if option in theirs:
                assert flag(c, option) == theirs[theirs.index(option) + 1], (name, option)
    (mpi,) = containers(named(docs, "Job", "mpi-group"))
    assert argv(mpi) == compose["mpi-group"]["entrypoint"]
    workers = environment(docs, containers(named(docs, "Job", "worker"))[0])
    for variable, value in compose["worker"]["environment"].items():
        if "${" not in str(value) and variable != "NANODIST_PS":  # compose's shards are ps-0, ps-1
            assert workers[variable] == str(value), variable


def test_the_ha_overlay_keeps_the_coordination_state_on_three_etcd_members_and_runs_two_replicas():
    docs = render(HA)
    etcd = named(docs, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["podManagementPolicy"] == "Parallel"
    service = named(docs, "Service", etcd["spec"]["serviceName"])
    assert service["spec"]["publishNotReadyAddresses"] is True  # members find each other before they are ready
    (member,) = containers(etcd)
    args = dict(a.split("=", 1) for a in member["args"])
    names = [f"etcd-{i}" for i in range(3)]
    assert args["--initial-cluster"] == ",".join(f"{n}=http://{n}.etcd:2380" for n in names)
    assert [path for path, volume in mounts(etcd, member) if "claim" in volume] == ["/var/lib/nanodist"]
    assert under(args["--data-dir"], "/var/lib/nanodist")
    assert not [s for s in of_kind(docs, "StatefulSet") if s["metadata"]["name"] == "lock"]
    for name in ("lock", "barrier"):
        replica = named(docs, "Deployment", name)
        assert replica["spec"]["replicas"] == 2, name
        (server,) = containers(replica)
        assert "--state-dir" not in argv(server), name
        store = environment(docs, server)["NANODIST_STORE"]
        assert store == "etcd://" + ",".join(f"{n}.etcd:2379" for n in names), name
    policy = named(docs, "NetworkPolicy", "etcd")
    client, peer = policy["spec"]["ingress"]
    assert [p["podSelector"]["matchLabels"] for p in client["from"]] == [{"app.kubernetes.io/component": "server"}]
    assert [p["podSelector"]["matchLabels"] for p in peer["from"]] == [{"app.kubernetes.io/name": "etcd"}]
    # Each shard is a replica set of two pods that elect their primary on the lock service the workers use,
    # keep nothing on disk, and advertise their own stable names; the workers name both, shard by shard.
    assert not [s for s in of_kind(docs, "StatefulSet") if s["metadata"]["name"] == "ps"]
    workers = environment(docs, containers(named(docs, "Job", "worker"))[0])
    lock = template_labels(named(docs, "Deployment", "lock"))
    shards = []
    for i in range(2):
        replicas = named(docs, "StatefulSet", f"ps-{i}")
        service = named(docs, "Service", replicas["spec"]["serviceName"])
        assert replicas["spec"]["replicas"] == 2
        assert service["spec"]["selector"].items() <= template_labels(replicas).items()
        (server,) = containers(replicas)
        port = flag(server, "--port")
        assert flag(server, "--replica-set") == f"shard-{i}"
        assert flag(server, "--coordinator") == workers["NANODIST_LOCK_ADDRESS"]
        assert flag(server, "--durability") == "none" and "--checkpoint-dir" not in argv(server)
        assert not replicas["spec"].get("volumeClaimTemplates") and not list(mounts(replicas, server))
        # $(POD_NAME) is the pod's own name, under the headless Service that publishes it.
        (pod_name,) = [v for v in server["env"] if v["name"] == "POD_NAME"]
        assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert flag(server, "--advertise") == f"$(POD_NAME).{service['metadata']['name']}:{port}"
        assert int(port) in [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
        pods = [f"{replicas['metadata']['name']}-{r}" for r in range(replicas["spec"]["replicas"])]
        shards.append("+".join(f"{name}.{service['metadata']['name']}:{port}" for name in pods))
        # A backup streams from its primary's gRPC port, and every replica elects on the lock service.
        labels = template_labels(replicas)
        assert admits(docs, labels, labels, "grpc") and admits(docs, labels, lock, "grpc"), replicas["metadata"]["name"]
    assert workers["NANODIST_PS"] == ",".join(shards)


def admits(docs: tuple[dict, ...], source: dict[str, str], target: dict[str, str], port: str) -> bool:
    """Whether a NetworkPolicy lets pods labelled `source` reach the named port of pods labelled `target`."""
    for policy in of_kind(docs, "NetworkPolicy"):
        if not policy["spec"]["podSelector"]["matchLabels"].items() <= target.items():
            continue
        for rule in policy["spec"].get("ingress", []):
            peers = [peer["podSelector"]["matchLabels"] for peer in rule["from"] if "podSelector" in peer]
            opened = {"protocol": "TCP", "port": port} in rule["ports"]
            if opened and any(peer.items() <= source.items() for peer in peers):
                return True
    return False
