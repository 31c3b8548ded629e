"""Across machines: three network namespaces (three hosts) joined by veth links to a bridge, one
`meshsl node` per host, training vertical.yaml-style traffic over real IP addresses."""
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HOSTS = {"hospital_a": "10.231.0.2", "hospital_b": "10.231.0.3", "lab": "10.231.0.4"}


def sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


@pytest.fixture
def hosts():
    """Create the namespaces; skip cleanly where namespaces or veth links are not permitted."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    tag = uuid.uuid4().hex[:5]
    bridge = f"mslbr{tag}"
    names = {node: f"msl-{tag}-{i}" for i, node in enumerate(HOSTS)}
    created = []
    try:
        if sh("ip", "link", "add", bridge, "type", "bridge").returncode != 0:
            pytest.skip("not permitted to create network devices (needs root / CAP_NET_ADMIN)")
        sh("ip", "link", "set", bridge, "up")
        for i, (node, address) in enumerate(HOSTS.items()):
            ns = names[node]
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


def test_vertical_topology_across_three_hosts(tmp_path, hosts):
    document = yaml.safe_load((ROOT / "topologies" / "vertical.yaml").read_text())
    for i, node in enumerate(document["nodes"]):
        node["endpoint"] = f"tcp://{HOSTS[node['name']]}:{7131 + i}"
        node.pop("metrics_port", None)
    document["training"]["epochs"] = 6
    topology = tmp_path / "vertical.yaml"
    topology.write_text(yaml.safe_dump(document))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = {}
    for node, ns in hosts.items():
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "meshsl", "node", node, "--topology", str(topology),
               "--base-dir", str(ROOT / "topologies"), "--checkpoint-dir", str(tmp_path / "ck")]
        if node == "lab":
            cmd += ["--summary-json", str(tmp_path / "summary.json")]
        procs[node] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        outputs = {node: proc.communicate(timeout=180)[0] for node, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for node, proc in procs.items():
        assert proc.returncode == 0, f"{node}:\n{outputs[node][-2000:]}"
    # binding a non-loopback address without CURVE is warned about loudly
    assert "CURVE" in outputs["hospital_a"] or "plain" in outputs["hospital_a"].lower()
    summary = yaml.safe_load((tmp_path / "summary.json").read_text())
    assert summary["tasks"]["cancer"]["eval"]["accuracy"] >= 0.93
    assert summary["edges"]["encoder_a->classifier"]["forward_bytes"] > 0
