#!/bin/bash
# A base image built from Debian's own packages, for hosts that cannot pull from a registry:
#   nodes/podman/base-image.sh [IMAGE]        (default localhost/debian-py:bookworm; about 2 minutes)
# then: podman build -f nodes/Dockerfile --build-arg BASE=localhost/debian-py:bookworm -t meshsl .
set -euo pipefail
IMAGE=${1:-localhost/debian-py:bookworm}
if podman image exists "$IMAGE"; then exit 0; fi
MIRROR=${MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -1 | tr -d ' ' || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOTFS" "$MIRROR"
tar -C "$ROOTFS" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE"
