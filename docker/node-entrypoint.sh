#!/bin/sh
# Start dockerd in a container that was given the capabilities of --privileged without --privileged
# itself (tests/e2e/multihost.py says why). Docker then mounts /sys and the cgroup hierarchies
# read-only, and dockerd must write both: /sys for its bridges, the cgroups for its containers.
# With --cgroupns private the hierarchies show this container's own cgroup as their root, so the
# inner containers nest under it. Under --privileged both mounts are rw already and this is a no-op.
set -eu
mount -o remount,rw /sys
for hierarchy in /sys/fs/cgroup/*/; do
  mount -o remount,bind,rw "$hierarchy"
done
# tini reaps the shims' orphans, which dockerd as PID 1 would leave as zombies.
exec tini -- dockerd "$@"
