"""The Python examples in README.md and docs/*.md run as written against live servers (only addresses change)."""

import glob
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import ROOT, Server

# The first marker found in an example names it, and each name belongs to exactly one example; the
# quick start must stay in the README.
MARKERS = {
    "ps": "ParameterServerClient([",
    "barrier": "BarrierClient(",
    "lock": "KVStore(",
    "comm": "comm = from_env(",
    "embeddings": "nd.EmbeddingBag(",
    "elastic": "@nd.elastic.run",
    "torch": "nd.DistributedOptimizer(",
}
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def python_blocks() -> list[tuple[str, str]]:
    """Every ```python block of every page, as (page, code)."""
    blocks = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            blocks += [(page, code) for code in re.findall(r"```python\n(.*?)```", f.read(), re.S)]
    return blocks


def examples() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for page, code in python_blocks():
        names = [name for name, marker in MARKERS.items() if marker in code][:1]
        assert names, f"{page}: a Python example must hold one of {list(MARKERS.values())}"
        assert names[0] not in found, f"{page} and {found[names[0]][0]} both hold the {names[0]!r} example"
        found[names[0]] = (page, code)
    return found


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_every_example_is_found_and_the_quick_start_is_in_the_readme():
    found = examples()
    assert sorted(found) == sorted(MARKERS)
    assert found["ps"][0] == "README.md"


@pytest.mark.parametrize("name", ["ps", "lock", "comm"])
def test_example_runs(start_server: Callable[..., Server], name: str) -> None:
    code = examples()[name][1]
    if name == "ps":
        code = code.replace("127.0.0.1:50051", start_server("ps").address)
    elif name == "lock":
        code = code.replace("127.0.0.1:50071", start_server("lock").address)
    result = run(code)
    assert result.returncode == 0, result.stderr


def assert_runs_alone_and_launched(tmp_path, name: str, world: int, *launch: str) -> None:
    """Example `name` runs as a plain script, and as `world` workers of `nanodist run *launch`."""
    code = examples()[name][1]
    alone = run(code)
    assert alone.returncode == 0, alone.stderr
    assert "rank 0 of 1 done" in alone.stdout
    script = tmp_path / "train.py"
    script.write_text(code)
    command = [sys.executable, "-m", "nanodist.workers.cli", "run", *launch, str(script)]
    job = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert all(f"rank {r} of {world} done" in job.stdout for r in range(world)), job.stdout[-3000:]


@pytest.mark.slow
def test_torch_example_runs_alone_and_under_nanodist_run(tmp_path) -> None:
    """The script of docs/torch.md, and 4 workers of it (an MPI and a TCP group)."""
    assert_runs_alone_and_launched(tmp_path, "torch", 4, "--groups", "mpi:2,tcp:2")


@pytest.mark.slow
def test_elastic_example_runs_alone_and_under_nanodist_run_elastic(tmp_path) -> None:
    """The script of docs/torch.md's elastic section, and an elastic group of 2 of it."""
    assert_runs_alone_and_launched(tmp_path, "elastic", 2, "--elastic", "--groups", "tcp:2")


@pytest.mark.slow
def test_embeddings_example_runs_under_nanodist_run(tmp_path) -> None:
    """The script of docs/embeddings.md (10M- and 5M-row tables) runs as 2 workers of a TCP group."""
    script = tmp_path / "train.py"
    script.write_text(examples()["embeddings"][1])
    command = [sys.executable, "-m", "nanodist.workers.cli", "run", "--groups", "tcp:2", str(script)]
    job = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert all(f"rank {r} of 2 done" in job.stdout for r in range(2)), job.stdout[-3000:]


def test_barrier_example_releases_four_members(start_server: Callable[..., Server]) -> None:
    """The example waits for 4 parties, so 4 copies run at once, each with its own member id."""
    code = examples()["barrier"][1].replace("127.0.0.1:50061", start_server("barrier").address)
    assert '"worker-0"' in code
    members = [
        subprocess.Popen(
            [sys.executable, "-c", code.replace('"worker-0"', f'"worker-{i}"')],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for member in members:
        out, err = member.communicate(timeout=90)
        assert member.returncode == 0, err
        assert "missing" not in out, out
