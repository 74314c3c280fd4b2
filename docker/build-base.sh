#!/usr/bin/env bash
# Build the base image offline from Debian packages: debootstrap a minimal
# bookworm with Python 3.11 (and etcd-server, for the HA layouts) from the mirror in this machine's apt configuration,
# then import it into Docker. For machines that cannot pull python:3.11-slim.
set -euo pipefail
tag=${1:-nanodist-base:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
# A base from before etcd was in the image is built again.
if docker image inspect "$tag" >/dev/null 2>&1 && docker run --rm "$tag" sh -c 'command -v etcd' >/dev/null 2>&1; then
  echo "docker-base: $tag already exists"
  exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
mirror=$(python3 "$here/apt_mirror.py" bookworm)
rootfs=$(mktemp -d /tmp/nanodist-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "docker-base: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,etcd-server bookworm "$rootfs" "$mirror" \
  > "$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$tag"
rm -f "$rootfs.log"
echo "docker-base: built $tag"
