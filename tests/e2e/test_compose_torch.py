"""docker-compose.torch.yml: examples/digits_cnn.py (nanodist.torch) as worker containers of the
torch image, against the services of docker-compose.yml, built from nothing on this machine.

The torch image (6 GB, PyPI's CUDA build of torch) takes about 10 minutes to build on 2 cores, a third
of the CI budget, so the default test run skips it: `make e2e-torch` runs it (or
NANODIST_E2E_TORCH=1 .venv/bin/pytest tests/e2e/test_compose_torch.py).
"""

import json
import os
import subprocess
import time

import pytest

from tests.e2e.compose import Cluster
from tests.e2e.conftest import build_images

pytestmark = pytest.mark.skipif(
    os.environ.get("NANODIST_E2E_TORCH") != "1",
    reason="the torch image takes ~10 min to build here; make e2e-torch runs this test",
)

TORCH_IMAGE = "nanodist:0.1.0-torch"


@pytest.fixture(scope="module")
def images() -> None:
    """The services' image and the torch variant (its wheelhouse comes from PyPI with pip download)."""
    build_images("docker", "docker-torch")


@pytest.fixture
def cluster(tmp_path, images):
    c = Cluster(tmp_path)
    c.files = ["-f", "docker-compose.yml", "-f", "docker-compose.torch.yml"]
    yield c
    c.down()
    leftovers = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={c.project}"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert leftovers == []


def test_torch_worker_containers_train_the_digits_cnn_against_the_compose_services(cluster):
    began = time.monotonic()
    up = cluster.compose("up", "-d", "--no-build", "--scale", "worker=2")
    assert up.returncode == 0, up.stderr
    workers = cluster.containers("worker") + cluster.containers("mpi-group")
    assert len(workers) == 3
    cluster.wait_exited(workers, timeout=900)
    finished = time.monotonic() - began
    for container in workers:
        assert cluster.state(container)["State"]["ExitCode"] == 0, cluster.logs(container)[-3000:]
        assert cluster.state(container)["Config"]["Image"] == TORCH_IMAGE
    (server,) = cluster.containers("ps-0")
    assert cluster.state(server)["Config"]["Image"] == "nanodist:0.1.0"  # the services stay on the light image
    run = cluster.runs / cluster.run_id
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 4 and len(metrics["epochs"]) == 20
    assert metrics["final_test_accuracy"] >= 0.97, metrics["epochs"][-1]
    assert (run / "training.png").exists()
    print(f"\ncompose torch: up to completion {finished:.1f} s; accuracy {metrics['final_test_accuracy']}")
