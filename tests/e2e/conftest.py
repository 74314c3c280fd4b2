"""The image and the compose clusters that the compose tests share."""

import subprocess
import time

import pytest

from tests.conftest import ROOT
from tests.e2e.compose import Cluster


@pytest.fixture(scope="module")
def image() -> str:
    """`make docker`: pulls nothing here; builds the Debian base with debootstrap and installs from a wheelhouse."""
    began = time.monotonic()
    subprocess.run(["make", "docker"], cwd=ROOT, check=True, timeout=1500)
    print(f"\nimage built in {time.monotonic() - began:.0f} s")
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
