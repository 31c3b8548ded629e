"""Hosts as network namespaces joined by veth links to one bridge, and nftables firewalls inside them.

Used by the firewall, partition and multi-host guide tests; everything skips cleanly where namespaces,
veth links or `nft` are not available (not root, no CAP_NET_ADMIN, nftables not installed)."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid

import pytest

# Drop every inbound TCP connection except replies to connections the host opened itself.
DROP_INBOUND = """
table inet meshsl_fw {
  chain input {
    type filter hook input priority 0; policy accept;
    iif lo accept
    ct state established,related accept
    meta l4proto tcp drop
  }
}
"""

# A cut link: nothing in or out (loopback excepted). Removing the table heals the link; TCP
# connections survive a short cut, retransmitting once it is back.
CUT = """
table inet meshsl_cut {
  chain input { type filter hook input priority -10; policy drop; iif lo accept; }
  chain output { type filter hook output priority -10; policy drop; oif lo accept; }
}
"""


def sh(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, input=stdin)


def need_nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed: apt-get install -y nftables")


@contextlib.contextmanager
def namespaces(addresses: dict[str, str]):
    """{host: IPv4 address} -> {host: namespace name}; /24 links on one bridge; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    tag = uuid.uuid4().hex[:5]
    bridge = f"mslbr{tag}"
    names = {host: f"msl-{tag}-{i}" for i, host in enumerate(addresses)}
    created = []
    try:
        if sh("ip", "link", "add", bridge, "type", "bridge").returncode != 0:
            pytest.skip("not permitted to create network devices (needs root / CAP_NET_ADMIN)")
        sh("ip", "link", "set", bridge, "up")
        for i, (host, address) in enumerate(addresses.items()):
            ns = names[host]
            if sh("ip", "netns", "add", ns).returncode != 0:
                pytest.skip("not permitted to create network namespaces")
            created.append(ns)
            outer, inner = f"msl{tag}o{i}", f"msl{tag}i{i}"
            for cmd in (["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
                        ["ip", "link", "set", inner, "netns", ns],
                        ["ip", "link", "set", outer, "master", bridge],
                        ["ip", "link", "set", outer, "up"],
                        ["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inner],
                        ["ip", "-n", ns, "link", "set", inner, "up"],
                        ["ip", "-n", ns, "link", "set", "lo", "up"]):
                result = sh(*cmd)
                if result.returncode != 0:
                    pytest.skip(f"cannot set up veth links: {' '.join(cmd)}: {result.stderr.strip()}")
        yield names
    finally:
        for ns in created:
            sh("ip", "netns", "del", ns)
        sh("ip", "link", "del", bridge)


def nft(ns: str, ruleset: str) -> None:
    result = sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=ruleset)
    if result.returncode != 0:
        pytest.skip(f"nft cannot load rules in a namespace: {result.stderr.strip()}")


def drop_inbound(ns: str) -> None:
    nft(ns, DROP_INBOUND)


def cut(ns: str) -> None:
    nft(ns, CUT)


def heal(ns: str) -> None:
    result = sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "meshsl_cut")
    assert result.returncode == 0, result.stderr


def inbound_connect(from_ns: str, address: str, port: int, timeout_s: float = 2.0) -> str:
    """Try a TCP connection from `from_ns`: 'connected', 'refused' (host answered) or 'timeout' (dropped)."""
    probe = ("import socket,sys\n"
             "try:\n"
             f"    socket.create_connection(({address!r}, {port}), timeout={timeout_s}); print('connected')\n"
             "except ConnectionRefusedError: print('refused')\n"
             "except OSError: print('timeout')\n")
    import sys
    return sh("ip", "netns", "exec", from_ns, sys.executable, "-c", probe).stdout.strip()
