"""The committed generated code must match what `make proto` produces from the .proto files."""

import filecmp
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "protos")


def test_generated_code_matches_the_protos(tmp_path):
    sources = sorted(glob.glob(os.path.join(PROTO_DIR, "nanodist", "v1", "*.proto")))
    staged = tmp_path / "protos"
    shutil.copytree(PROTO_DIR, staged, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{staged}",
            f"--python_out={staged}",
            f"--pyi_out={staged}",
            f"--grpc_python_out={staged}",
            *[str(staged / os.path.relpath(s, PROTO_DIR)) for s in sources],
        ],
        check=True,
    )
    generated = sorted(p for p in os.listdir(staged / "nanodist" / "v1") if p.endswith((".py", ".pyi")))
    assert generated, "protoc produced nothing"
    for name in generated:
        committed = os.path.join(PROTO_DIR, "nanodist", "v1", name)
        assert os.path.exists(committed), f"{name} is not committed; run `make proto`"
        assert filecmp.cmp(committed, staged / "nanodist" / "v1" / name, shallow=False), (
            f"{name} is out of date with its .proto; run `make proto`"
        )
