"""The README's Python examples run as written against live servers (only the addresses change)."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def examples() -> dict[str, str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    found = {}
    for block in blocks:
        for marker, name in (
            ("ParameterServerClient([", "ps"),
            ("KVStore(", "lock"),
            ("Communicator.from_env()", "comm"),
        ):
            if marker in block:
                found[name] = block
    return found


@pytest.mark.parametrize("name", ["ps", "lock", "comm"])
def test_readme_example_runs(start_server, name):
    code = examples()[name]
    if name == "ps":
        code = code.replace("127.0.0.1:50051", start_server("ps").address)
    elif name == "lock":
        code = code.replace("127.0.0.1:50071", start_server("lock").address)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
