#!/bin/bash
# Build the meshsl image with podman on a host without registry access (CI, these machines): the base from
# Debian's packages (base-image.sh), pip inside the build using this host's pip configuration and local
# wheel folders (mounted read-only for the RUN steps), so torch comes from the same CPU wheel as outside.
#   nodes/podman/build-image.sh [TAG]            (default localhost/meshsl:latest)
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-localhost/meshsl:latest}
BASE=${BASE:-localhost/debian-py:bookworm}
nodes/podman/base-image.sh "$BASE"
mounts=()
for path in /etc/pip.conf /etc/xdg/pip /opt/wheels /opt/pypi /opt/pypi-more /etc/ssl/certs; do
  if [ -e "$path" ]; then mounts+=(--volume "$path:$path:ro"); fi
done
# the CPU wheel on this host's disk, when there is one (pip would otherwise weigh it against the CUDA build)
wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
torch_spec=(); if [ -n "$wheel" ]; then torch_spec=(--build-arg TORCH_SPEC="$wheel"); fi
podman build "${mounts[@]}" "${torch_spec[@]}" --build-arg BASE="$BASE" --build-arg TORCH_INDEX= \
  -f nodes/Dockerfile -t "$TAG" .
