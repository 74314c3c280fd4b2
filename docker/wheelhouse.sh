#!/usr/bin/env bash
# Fill docker/wheelhouse with wheels for the image's Python (3.11, manylinux x86_64):
# nanodist itself and its dependencies, so the image build needs no network.
#   wheelhouse.sh torch   fills docker/wheelhouse-extras with an extra's requirements (torch and
#                         its dependencies) instead; with TORCH_INDEX_URL set it downloads nothing,
#                         as the image build then installs torch from that index.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${PIP:-.venv/bin/pip}
python=${PYTHON:-.venv/bin/python}
extra=${1:-}
out=docker/wheelhouse${extra:+-extras}
mkdir -p "$out"
requirements=$("$python" -c 'import sys, tomllib; project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(project["optional-dependencies"][sys.argv[1]] if sys.argv[1] else project["dependencies"]))' "$extra")
if [ -n "$extra" ]; then
  # requirements.txt is written once the download is complete: it marks the wheels as up to date.
  if [ -z "${TORCH_INDEX_URL:-}" ] && [ "$requirements" = "$(cat "$out/requirements.txt" 2>/dev/null)" ] \
    && ls "$out"/*.whl >/dev/null 2>&1; then
    echo "wheelhouse-extras: up to date ($(du -sh "$out" | cut -f1))"
    exit 0
  fi
  rm -f "$out"/*.whl "$out/requirements.txt"  # wheels of another extra or another pin
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "wheelhouse-extras: none downloaded; the build installs $extra from TORCH_INDEX_URL"
    exit 0
  fi
fi
echo "$requirements" > "$out/requirements.tmp"
# Every manylinux tag that Debian bookworm's glibc (2.36) runs.
platforms=(--platform linux_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64
  --platform manylinux2014_x86_64)
for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
"$pip" download --quiet --dest "$out" --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
  "${platforms[@]}" -r "$out/requirements.tmp"
mv "$out/requirements.tmp" "$out/requirements.txt"
if [ -z "$extra" ]; then
  rm -f "$out"/nanodist-*.whl
  # Fixed timestamps make the wheel reproducible: an unchanged tree keeps the image builds' cache valid.
  SOURCE_DATE_EPOCH=315532800 "$pip" wheel --quiet --no-deps --wheel-dir "$out" .
fi
echo "$(basename "$out"): $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1)"
