#!/usr/bin/env bash
# Fill docker/wheelhouse with wheels for the image's Python (3.11, manylinux x86_64):
# nanodist itself and its dependencies, so the image build needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${PIP:-.venv/bin/pip}
python=${PYTHON:-.venv/bin/python}
out=docker/wheelhouse
mkdir -p "$out"
"$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
  > "$out/requirements.txt"
"$pip" download --quiet --dest "$out" --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform linux_x86_64 -r "$out/requirements.txt"
rm -f "$out"/nanodist-*.whl
"$pip" wheel --quiet --no-deps --wheel-dir "$out" .
echo "wheelhouse: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1)"
