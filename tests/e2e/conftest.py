"""The image and the compose clusters that the compose tests share."""

import fcntl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.compose import Cluster


def build_images(*targets: str) -> None:
    """`make` the image targets, one build at a time on this machine: two builds would fill the same
    wheelhouse. (make test keeps the docker tests in one xdist stream; this holds even if that breaks.)"""
    began = time.monotonic()
    with open(Path(tempfile.gettempdir()) / "nanodist-image-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["make", *targets], cwd=ROOT, check=True, timeout=1500)
    print(f"\n{' '.join(targets)}: {time.monotonic() - began:.0f} s")


@pytest.fixture(scope="module")
def image() -> str:
    """`make docker`: pulls nothing here; builds the Debian base with debootstrap and installs from a wheelhouse."""
    build_images("docker")
    return "nanodist:0.1.0"


@pytest.fixture
def cluster(tmp_path, image):
    clusters: list[Cluster] = []

    def make(**settings: str) -> Cluster:
        clusters.append(Cluster(tmp_path, **settings))
        return clusters[-1]

    yield make
    for c in clusters:
        c.down()
        leftovers = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={c.project}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert leftovers == []
