"""The Ray engine on a real two-raylet Ray cluster on this machine: SplitFed clients on one raylet, the
server on the other, messages across a ZeroMQ link; the result equals the in-process simulation bit for
bit. A killed actor fails the simulation loudly (Ray detects it), no hang. Skipped without Ray."""
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from meshsl.config.loader import load_yaml, parse_spec  # noqa: E402
from meshsl.errors import PeerFailed  # noqa: E402
from meshsl.coordinator.runtime import RunOptions  # noqa: E402
from meshsl.launch.ray_engine import plan_actors, simulate_on_ray  # noqa: E402
from meshsl.launch.simulate import simulate  # noqa: E402
from meshsl.topology.model import topology_from_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head` plus a second raylet, one CPU each; stopped (and only then) at the end."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard=false", *common],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=180)
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:  # the second raylet registers
            assert time.monotonic() < deadline, "second raylet never joined"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _splitfed(steps: int):
    document = load_yaml((ROOT / "topologies" / "splitfed.yaml").read_text())
    for node in document["nodes"]:  # one CPU each on one-CPU raylets: clients and server on different raylets
        node["ray"] = {"num_cpus": 1}
    document["training"].update(steps=steps)
    document["training"].pop("epochs", None)
    topology = topology_from_spec(parse_spec(document), str(ROOT / "topologies" / "splitfed.yaml"),
                                  ROOT / "topologies")
    return document, topology


def test_plan_splits_client_lanes_between_actors():
    document, topology = _splitfed(2)
    document["nodes"][0]["ray"] = {"num_cpus": 0.5, "actors": 3}
    plans = plan_actors(topology_from_spec(parse_spec(document), "<t>", ROOT / "topologies"))
    assert [p.nodes for p in plans] == [("clinic0",), ("clinic1",), ("clinic2", "clinic3"), ("server",)]
    assert [p.num_cpus for p in plans] == [0.5, 0.5, 0.5, 1.0]


def test_two_raylets_equal_in_process(cluster):
    document, topology = _splitfed(steps=6)
    result = simulate_on_ray(topology, document, RunOptions(steps=6), address=cluster, timeout=240,
                             return_weights=True)
    assert len({a["ray_node"] for a in result["actors"]}) == 2  # really across both raylets
    assert all(a["refused"] == 0 for a in result["actors"])
    summary, runtimes = asyncio.run(simulate(topology, RunOptions(steps=6)))
    assert result["summary"]["steps"] == summary["steps"] == 6
    assert result["summary"]["tasks"]["digit"]["train"] == summary["tasks"]["digit"]["train"]
    assert result["summary"]["tasks"]["digit"]["eval"]["loss"] == summary["tasks"]["digit"]["eval"]["loss"]
    compared = 0
    for node, runtime in runtimes.items():
        for segment, module in runtime.worker.modules.items():
            for key, tensor in module.state_dict().items():
                assert np.array_equal(result["weights"][node][segment][key], tensor.numpy()), (node, key)
                compared += 1
    assert compared == 5 * 4  # 4 clients' bottom + the server's top, 2 layers x (weight, bias) each


def test_a_killed_actor_fails_the_simulation(cluster):
    document, topology = _splitfed(steps=100_000)
    outcome = {}

    def run():
        try:
            simulate_on_ray(topology, document, RunOptions(steps=100_000, evaluate=False), timeout=240)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 180
    victim = None
    while victim is None and thread.is_alive():
        assert time.monotonic() < deadline, "the clients' actor never appeared"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("clinic.a0")]
        victim = names[0] if names else None
        time.sleep(0.1)
    ray.kill(ray.get_actor(victim))
    killed = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the simulation hung after an actor died"
    assert isinstance(outcome.get("error"), PeerFailed), outcome
    assert "clinic" in str(outcome["error"]) and time.monotonic() - killed < 120


def test_command_line_on_the_cluster(cluster, tmp_path):
    """`meshsl simulate --engine ray --ray-address` (the YAML next to the shipped one: same data paths)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from meshsl.cli import app
    document, _ = _splitfed(steps=2)
    path = tmp_path / "splitfed.yaml"
    path.write_text(yaml.safe_dump(document))
    out = tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["simulate", str(path), "--engine", "ray", "--ray-address", cluster,
                                      "--no-eval", "--summary-json", str(out), "--timeout", "240"])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["steps"] == 2 and summary["engine"]["name"] == "ray"
    assert [a["nodes"] for a in summary["engine"]["actors"]] == [4, 1]
