"""The image and the compose clusters that the compose tests share."""

import fcntl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.compose import Cluster

BUILD_SECONDS = 1500  # the longest an image build may take: the torch image, cold, on 2 busy cores


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test's time limit is for its own work: whichever test first needs an image also builds it
    (minutes, on a cold machine), so every test here gets the build's bound on top of its own."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            marker = item.get_closest_marker("timeout")
            own = marker.args[0] if marker and marker.args else float(config.getini("timeout"))
            item.add_marker(pytest.mark.timeout(own + BUILD_SECONDS), append=False)


def build_images(*targets: str) -> None:
    """`make` the image targets, one build at a time on this machine: two builds would fill the same
    wheelhouse. (make test keeps the docker tests in one xdist stream; this holds even if that breaks.)"""
    began = time.monotonic()
    with open(Path(tempfile.gettempdir()) / "nanodist-image-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["make", *targets], cwd=ROOT, check=True, timeout=BUILD_SECONDS)
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
