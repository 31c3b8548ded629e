"""Across machines: three network namespaces (three hosts) joined by veth links to a bridge, one
`meshsl node` per host, training vertical.yaml-style traffic over real IP addresses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.netns_hosts import namespaces

ROOT = Path(__file__).resolve().parents[2]
HOSTS = {"hospital_a": "10.231.0.2", "hospital_b": "10.231.0.3", "lab": "10.231.0.4"}


@pytest.fixture
def hosts():
    """Create the namespaces; skip cleanly where namespaces or veth links are not permitted."""
    with namespaces(HOSTS) as names:
        yield names


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
