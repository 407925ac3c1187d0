#!/usr/bin/env bash
# A container engine for tests/e2e/test_container.py on CI's machine, where no docker daemon
# runs: podman from Debian, set up for this sandbox (runc with cgroupfs; it may not raise
# rlimits, so containers get ones below the host's), and the debian:bookworm-slim base image,
# built with mmdebstrap from Debian's packages when no registry serves it.
set -euo pipefail
if ! command -v podman > /dev/null || ! command -v mmdebstrap > /dev/null; then
  apt-get update -qq
  # the set this was tested with (rootful podman itself needs podman, runc and the CNI plugins)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc mmdebstrap uidmap \
    slirp4netns fuse-overlayfs > /dev/null
fi
if [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  cat > /etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
fi
base=docker.io/library/debian:bookworm-slim
if ! podman image exists "$base" && ! timeout 60 podman pull -q "$base" > /dev/null 2>&1; then
  rootfs=$(mktemp --suffix .tar)
  mmdebstrap --quiet --variant=minbase bookworm "$rootfs"
  podman import -q "$rootfs" "$base" > /dev/null
  rm -f "$rootfs"
fi
podman run --rm "$base" true && echo "container engine: podman ready"
