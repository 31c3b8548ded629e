"""nodes/README.md, run as written: its code blocks, in order, each on the host its tag names, in three
network namespaces. The hospitals' blocks install a drop-inbound firewall; the test proves it works and
that training with CURVE still succeeds, with each secret key only on its owner's host.

The one step a person does by hand, pasting the printed `public_key` lines into the topology and sending
the file to the hospitals, is done here exactly as the guide describes it."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support import netns_hosts

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "nodes" / "README.md"
BLOCK = re.compile(r"^```(\w+)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def guide_blocks() -> list[tuple[str, str, bool, str]]:
    """(language, host or file name, runs in the background, text) of every tagged code block."""
    blocks = []
    for language, tag, text in BLOCK.findall(GUIDE.read_text()):
        tag = tag.strip()
        if not tag:
            continue  # untagged blocks are not run (docker, on a machine with Docker)
        background = tag.endswith("&")
        blocks.append((language, tag.rstrip("&").strip(), background, text))
    return blocks


def guide_hosts() -> dict[str, str]:
    """The host table: node -> address."""
    rows = re.findall(r"^\|[^|\n]*?(\d+\.\d+\.\d+\.\d+)\s*\|\s*`(\w+)`", GUIDE.read_text(), re.M)
    return {node: address for address, node in rows}


@pytest.mark.unit
def test_guide_blocks_are_tagged_with_known_hosts():
    hosts = guide_hosts()
    assert set(hosts) == {"hospital_a", "hospital_b", "lab"}
    blocks = guide_blocks()
    assert {tag for language, tag, _, _ in blocks if language == "bash"} == set(hosts)
    assert [tag for language, tag, _, _ in blocks if language == "yaml"] == ["topology.yaml"]
    assert sum(background for _, _, background, _ in blocks) == 3  # one node per host


def test_multihost_guide_runs_as_written(tmp_path):
    netns_hosts.need_nft()
    addresses = guide_hosts()
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "meshsl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m meshsl "$@"\n')
    (shim / "meshsl").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
               PATH=f"{shim}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    folders = {host: tmp_path / host for host in addresses}
    for folder in folders.values():
        folder.mkdir()
    printed: dict[str, str] = {host: "" for host in addresses}
    running: dict[str, subprocess.Popen] = {}
    with netns_hosts.namespaces(addresses) as ns:
        try:
            for language, tag, background, text in guide_blocks():
                if language == "yaml":
                    # Step 2 by hand: paste each party's printed line, send the file to every party.
                    for node in addresses:
                        key = re.findall(r'^public_key: "([^"]+)"$', printed[node], re.M)
                        assert key, f"{node} printed no public_key line:\n{printed[node]}"
                        text = text.replace(f'"<{node}>"', f'"{key[-1]}"')
                    for folder in folders.values():
                        (folder / tag).write_text(text)
                    continue
                command = ["ip", "netns", "exec", ns[tag], "bash", "-euo", "pipefail", "-c", text]
                if background:
                    if not running:  # everything before the nodes ran: the hospitals' firewalls are up
                        for hospital in ("hospital_a", "hospital_b"):
                            assert netns_hosts.inbound_connect(ns["lab"], addresses[hospital], 7003) == "timeout"
                        assert netns_hosts.inbound_connect(ns["hospital_a"], addresses["lab"], 7003) == "refused"
                    running[tag] = subprocess.Popen(command, cwd=folders[tag], env=env, text=True,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                    continue
                result = subprocess.run(command, cwd=folders[tag], env=env, capture_output=True, text=True,
                                        timeout=120)
                if result.returncode != 0 and "nft" in text and "Operation not permitted" in result.stderr:
                    pytest.skip(f"nft cannot load rules in a namespace: {result.stderr.strip()}")
                assert result.returncode == 0, f"on {tag}:\n{text}\n{result.stdout}\n{result.stderr}"
                printed[tag] += result.stdout
            outputs = {host: proc.communicate(timeout=240)[0] for host, proc in running.items()}
        finally:
            for proc in running.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    for host, proc in running.items():
        assert proc.returncode == 0, f"{host}:\n{outputs[host][-3000:]}"
    summary = json.loads((folders["lab"] / "summary.json").read_text())
    assert summary["tasks"]["cancer"]["eval"]["accuracy"] >= 0.93
    assert summary["edges"]["encoder_b->classifier"]["backward_bytes"] > 0
    assert all("WITHOUT CURVE" not in text for text in outputs.values())
    # Keys stayed with their owners: each host holds its own secret key and no other.
    for host, folder in folders.items():
        assert sorted(p.name for p in folder.rglob("*.key_secret")) == [f"{host}.key_secret"]
    targets = json.loads((folders["lab"] / "targets.json").read_text())
    assert [t["labels"]["node"] for t in targets] == ["lab"]
    assert targets[0]["targets"] == [f"{addresses['lab']}:9103"]
    topology = yaml.safe_load((folders["hospital_a"] / "topology.yaml").read_text())
    assert all(len(n["public_key"]) == 40 for n in topology["nodes"])
    shutil.rmtree(tmp_path / "bin")


@pytest.mark.unit
def test_compose_runs_the_dial_out_topology_unedited():
    """nodes/compose.yaml names topology files and nodes that exist, and carries no endpoint of its own
    except the lab's bind address (peers' endpoints come from the topology)."""
    from meshsl.topology import load_topology
    compose = yaml.safe_load((ROOT / "nodes" / "compose.yaml").read_text())
    for service, spec in compose["services"].items():
        command = spec["command"]
        topology = load_topology(ROOT / "topologies" / Path(command[command.index("--topology") + 1]).name)
        assert command[0] == "node" and command[1] == service and service in topology.nodes
        assert "--resume" in command
        assert not [arg for arg in command if "tcp://" in arg]
        bind = (spec.get("environment") or {}).get("MESHSL_BIND")
        assert (bind is not None) == topology.nodes[service].inbound
        if not topology.nodes[service].inbound:
            assert len(spec["networks"]) == 1  # a hospital shares a network with the lab only
