#!/bin/bash
# Make podman usable on a Debian 12 host with a hybrid cgroup layout (what CI and these machines have):
# runc instead of crun, and ulimits the runtime can set. Run as root; changes nothing already configured.
set -euo pipefail
# dnsname: containers of one compose project reach each other by service name (CNI networks)
packages=(podman debootstrap runc uidmap slirp4netns fuse-overlayfs containernetworking-plugins
          golang-github-containernetworking-plugin-dnsname nftables)
if ! dpkg -s "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
conf=/etc/containers/containers.conf
if [ ! -s "$conf" ]; then
  mkdir -p /etc/containers
  cat > "$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=20000:20000"]

[engine]
runtime = "runc"
CONF
fi
