"""Parties behind firewalls: dial-out nodes (`inbound: false`) in network namespaces whose nftables rules
drop every inbound TCP connection, CURVE routes that cannot be taken over, link cuts and partitions."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
import zmq

from support import netns_hosts

ROOT = Path(__file__).resolve().parents[2]
MESHSL = [sys.executable, "-m", "meshsl"]
HOSTS = {"hospital_a": "10.232.0.2", "hospital_b": "10.232.0.3", "lab": "10.232.0.4"}
LAB_ENDPOINT = f"tcp://{HOSTS['lab']}:7131"


def dial_out_vertical(path: Path, **changes) -> Path:
    """topologies/vertical.yaml with both hospitals dialling out to the lab (the only inbound port)."""
    document = yaml.safe_load((ROOT / "topologies" / "vertical.yaml").read_text())
    for node in document["nodes"]:
        node.pop("metrics_port", None)
        if node["name"] == "lab":
            node["endpoint"] = LAB_ENDPOINT
        else:
            node.pop("endpoint")
            node["inbound"] = False
    for key, value in changes.items():
        document[key] = {**document.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# -- validation and tooling (no network) -----------------------------------------------------------
@pytest.mark.unit  # (the module's processes would make it e2e)
def test_two_dial_out_nodes_that_must_talk_are_rejected_naming_both(tmp_path):
    from meshsl.config.loader import ConfigErrors
    from meshsl.topology import load_topology
    document = yaml.safe_load((ROOT / "topologies" / "vertical.yaml").read_text())
    for node in document["nodes"]:
        if node["name"] in ("hospital_a", "lab"):
            node.pop("endpoint")
            node["inbound"] = False
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigErrors) as caught:
        load_topology(path)
    text = str(caught.value)
    assert "nodes[0](hospital_a).inbound" in text and "nodes[2](lab).inbound" in text
    assert "'hospital_a' and 'lab'" in text and "hospital_b" not in text  # hospital_b accepts inbound


@pytest.mark.unit  # (the module's processes would make it e2e)
def test_dial_out_node_declares_no_endpoint_and_inbound_nodes_need_one(tmp_path):
    from meshsl.config.loader import ConfigErrors
    from meshsl.topology import load_topology
    for change, expected in (({"inbound": False}, "binds nothing: remove its endpoint"),
                             ({"endpoint": None}, "needs an endpoint")):
        document = yaml.safe_load((ROOT / "topologies" / "vertical.yaml").read_text())
        document["nodes"][0].update(change)
        if change.get("endpoint", "") is None:
            del document["nodes"][0]["endpoint"]
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(document))
        with pytest.raises(ConfigErrors) as caught:
            load_topology(path)
        assert expected in str(caught.value) and "nodes[0]" in str(caught.value)


def test_keys_public_prints_the_line_the_topology_takes(tmp_path):
    subprocess.run([*MESHSL, "keys", "generate", str(tmp_path / "keys"), "--nodes", "hospital_a"],
                   check=True, capture_output=True)
    (tmp_path / "keys" / "hospital_a.key").unlink()  # the secret file alone is enough
    shown = subprocess.run([*MESHSL, "keys", "public", str(tmp_path / "keys"), "--node", "hospital_a"],
                           capture_output=True, text=True, check=True).stdout
    line = yaml.safe_load(shown)
    from meshsl.security.keys import load_secret_file
    public, _ = load_secret_file(tmp_path / "keys" / "hospital_a.key_secret")
    assert line == {"public_key": public.decode()}
    missing = subprocess.run([*MESHSL, "keys", "public", str(tmp_path / "keys"), "--node", "lab"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "lab.key_secret is missing" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.integration  # (the module's processes would make it e2e)
def test_dial_out_route_is_bound_to_the_authenticated_key(tmp_path):
    """Another key on the allow-list claiming the dial-out node's route neither gets its messages nor
    moves the route; the genuine node's messages arrive named after it, and it receives the replies."""
    from meshsl.security.keys import KeyRing
    from meshsl.transport.zmq_backend import ZmqTransport
    keys = {name: zmq.curve_keypair() for name in ("lab", "hospital_a", "intruder")}
    port = _free_port()

    def ring(node: str) -> KeyRing:
        return KeyRing(own_node=node, public_key=keys[node][0], secret_key=keys[node][1],
                       peers={n: k[0] for n, k in keys.items() if n != node})

    async def scenario() -> None:
        book = {"lab": f"tcp://127.0.0.1:{port}", "hospital_a": None, "intruder": None}
        lab = ZmqTransport("lab", book["lab"], book, keyring=ring("lab"))
        hospital = ZmqTransport("hospital_a", None, book, keyring=ring("hospital_a"))
        await lab.start()
        ctx = zmq.asyncio.Context()
        intruder = ctx.socket(zmq.DEALER)  # holds a key the lab accepts, claims hospital_a's route
        intruder.curve_publickey, intruder.curve_secretkey = keys["intruder"]
        intruder.curve_serverkey = keys["lab"][0]
        intruder.setsockopt(zmq.ROUTING_ID, b"hospital_a#f00")
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(book["lab"])
        try:
            await intruder.send_multipart([b"", ])  # an announcement under the stolen name
            await intruder.send_multipart([b"hello"])
            sender, frames = await asyncio.wait_for(lab.recv(), 10)
            assert sender.startswith("\x00spoofed:intruder:hospital_a")  # the node rejects this one
            assert "hospital_a" not in lab._routes
            await hospital.start()
            await asyncio.wait_for(hospital.send("lab", [b"activation"]), 10)
            sender, frames = await asyncio.wait_for(lab.recv(), 10)
            assert (sender, bytes(frames[0])) == ("hospital_a", b"activation")
            await asyncio.wait_for(lab.send("hospital_a", [b"gradient"]), 10)
            sender, frames = await asyncio.wait_for(hospital.recv(), 10)
            assert (sender, bytes(frames[0])) == ("lab", b"gradient")
            assert await intruder.poll(300) == 0  # nothing for hospital_a reached the intruder
        finally:
            intruder.close(0)
            ctx.term()
            await hospital.close()
            await lab.close()

    asyncio.run(scenario())


@pytest.mark.integration  # (the module's processes would make it e2e)
def test_a_dial_out_node_with_a_key_off_the_allow_list_is_refused_and_told(tmp_path):
    """The lab refuses a dial-out node whose key it does not list (counted there); the node learns that
    the lab refused its key (what stops it after the startup timeout) and nothing it sends arrives."""
    from meshsl.security.keys import KeyRing
    from meshsl.transport.zmq_backend import ZmqTransport
    lab_keys, known, impostor = zmq.curve_keypair(), zmq.curve_keypair(), zmq.curve_keypair()
    port = _free_port()
    refusals = []

    async def scenario() -> None:
        book = {"lab": f"tcp://127.0.0.1:{port}", "hospital_a": None}
        lab = ZmqTransport("lab", book["lab"], book, on_auth_refused=refusals.append,
                           keyring=KeyRing(own_node="lab", public_key=lab_keys[0], secret_key=lab_keys[1],
                                           peers={"hospital_a": known[0]}))
        hospital = ZmqTransport("hospital_a", None, book,
                                keyring=KeyRing(own_node="hospital_a", public_key=impostor[0],
                                                secret_key=impostor[1], peers={"lab": lab_keys[0]}))
        await lab.start()
        await hospital.start()
        try:
            hospital.try_send("lab", [b"x"])  # queued or not: it must never arrive
            deadline = asyncio.get_running_loop().time() + 20
            while not hospital.refused_by.get("lab") and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the transport's refusal record, with a deadline
            assert hospital.refused_by.get("lab", 0) >= 1
            assert lab.recv_nowait() is None and "hospital_a" not in lab._routes
        finally:
            await hospital.close()
            await lab.close()

    asyncio.run(scenario())
    assert "unknown_key" in refusals


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- hosts in network namespaces ---------------------------------------------------------------------
class Nodes:
    """One `meshsl node` per host namespace, each in its own working folder; the lab's progress is read."""

    def __init__(self, hosts: dict[str, str], topology: Path, work: Path, args=()) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.outputs: dict[str, list[str]] = {}
        self.steps_seen = 0
        self.step_event = threading.Condition()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        for node, ns in hosts.items():
            folder = work / node
            folder.mkdir(parents=True, exist_ok=True)
            cmd = ["ip", "netns", "exec", ns, *MESHSL, "node", node, "--topology", str(topology),
                   "--base-dir", str(ROOT / "topologies"), "--checkpoint-dir", str(folder / "ck"),
                   "--weights-out", str(folder / "weights"), *args]
            if node == "lab":
                cmd += ["--summary-json", str(work / "summary.json"), "--progress-stream"]
            self.outputs[node] = []
            self.procs[node] = proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True, cwd=folder)
            threading.Thread(target=self._read, args=(node, proc), daemon=True).start()

    def _read(self, node: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.outputs[node].append(line)
            if line.startswith("MESHSL_PROGRESS ") and '"step"' in line:
                with self.step_event:
                    self.steps_seen += 1
                    self.step_event.notify_all()

    def wait_for_steps(self, steps: int, timeout_s: float) -> None:
        with self.step_event:
            assert self.step_event.wait_for(lambda: self.steps_seen >= steps or self._any_exited(), timeout_s), \
                f"no step {steps} within {timeout_s}s: {self.text('lab')[-1500:]}"
        assert not self._any_exited(), self.report()

    def _any_exited(self) -> bool:
        return any(p.poll() is not None for p in self.procs.values())

    def wait(self, timeout_s: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        try:
            return {node: proc.wait(timeout=max(1.0, deadline - time.monotonic())) for node, proc in self.procs.items()}
        finally:
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def text(self, node: str) -> str:
        return "".join(self.outputs[node])

    def report(self) -> str:
        return "\n".join(f"--- {n} (exit {p.poll()}):\n{self.text(n)[-2500:]}" for n, p in self.procs.items())


def weights_of(folder: Path) -> dict:
    from safetensors.torch import load_file
    return {f"{path.name}:{k}": v for path in sorted(folder.glob("*.safetensors")) for k, v in load_file(path).items()}


@pytest.fixture
def firewalled():
    """Three hosts; both hospitals drop every inbound TCP connection (proven: a connect times out
    where, before the rule, the host answered with a refusal)."""
    netns_hosts.need_nft()
    with netns_hosts.namespaces(HOSTS) as hosts:
        for hospital in ("hospital_a", "hospital_b"):
            assert netns_hosts.inbound_connect(hosts["lab"], HOSTS[hospital], 7131) == "refused"
            netns_hosts.drop_inbound(hosts[hospital])
            assert netns_hosts.inbound_connect(hosts["lab"], HOSTS[hospital], 7131) == "timeout"
        assert netns_hosts.inbound_connect(hosts["hospital_a"], HOSTS["lab"], 7131) == "refused"  # lab is open
        yield hosts


RECOVERING = {"checkpoint": {"every": 5}, "training": {"epochs": 10}}  # 150 steps


def uninterrupted_weights(topology: Path) -> dict:
    """The same topology trained without a fault, every node in this process (bit-identical to a run
    over processes: same seed, same batches, one compute thread per node)."""
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate
    from meshsl.topology import load_topology
    document = yaml.safe_load(topology.read_text())
    document["checkpoint"]["directory"] = str(topology.parent / "reference-checkpoints")
    path = topology.parent / "reference.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    _, runtimes = asyncio.run(simulate(load_topology(path), RunOptions()))
    return {name: {f"{segment}.safetensors:{k}": v for segment, module in runtime.worker.modules.items()
                   for k, v in module.state_dict().items()} for name, runtime in runtimes.items()}


def assert_weights_equal(expected: dict, work: Path) -> None:
    for node in HOSTS:
        got = weights_of(work / node / "weights")
        assert got and got.keys() == expected[node].keys(), node
        for key, value in expected[node].items():
            assert value.equal(got[key]), f"{node} {key} differs from the uninterrupted run"


def test_hospitals_behind_firewalls_train_and_survive_a_ten_second_link_cut(tmp_path, firewalled):
    """Both hospitals only dial out, yet vertical.yaml trains with the lab. hospital_a's link is cut for
    10 s mid-training (default timeouts: the lab declares it lost after 5 s, waits for it, rolls every
    node back to the last common checkpoint once it is back and replays): the final weights are those
    of an uninterrupted run."""
    topology = dial_out_vertical(tmp_path / "vertical.yaml", **RECOVERING)
    expected = uninterrupted_weights(topology)
    nodes = Nodes(firewalled, topology, tmp_path / "cut")
    nodes.wait_for_steps(8, 120)
    netns_hosts.cut(firewalled["hospital_a"])
    assert netns_hosts.inbound_connect(firewalled["hospital_a"], HOSTS["lab"], 7131, 1.0) == "timeout"
    time.sleep(10)  # the fault itself lasts 10 s (not a synchronisation)
    netns_hosts.heal(firewalled["hospital_a"])
    assert nodes.wait(240) == {n: 0 for n in HOSTS}, nodes.report()
    assert '"event": "nodes_lost"' in nodes.text("lab") and '"event": "recovered"' in nodes.text("lab")
    assert_weights_equal(expected, tmp_path / "cut")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["tasks"]["cancer"]["eval"]["accuracy"] >= 0.93
    assert summary["edges"]["encoder_a->classifier"]["backward_bytes"] > 0  # gradients came back in
    assert "WITHOUT CURVE" in nodes.text("lab") and "WITHOUT CURVE" not in nodes.text("hospital_a")


@pytest.mark.slow
def test_a_partition_past_the_timeouts_fails_everywhere_naming_the_party_and_resumes(tmp_path, firewalled):
    changes = dict(RECOVERING, retry={"heartbeat_timeout_s": 3.0, "startup_timeout_s": 20.0})
    topology = dial_out_vertical(tmp_path / "vertical.yaml", **changes)
    expected = uninterrupted_weights(topology)
    nodes = Nodes(firewalled, topology, tmp_path / "cut")
    nodes.wait_for_steps(8, 120)
    netns_hosts.cut(firewalled["hospital_a"])
    codes = nodes.wait(120)  # nothing hangs: every side gives up on its own
    netns_hosts.heal(firewalled["hospital_a"])
    assert all(code != 0 for code in codes.values()), nodes.report()
    for node in ("lab", "hospital_b"):
        assert "hospital_a" in nodes.text(node) and "error:" in nodes.text(node), nodes.report()
    assert "coordinator 'lab' silent" in nodes.text("hospital_a"), nodes.report()

    resumed = Nodes(firewalled, topology, tmp_path / "cut", args=["--resume"])
    assert resumed.wait(180) == {n: 0 for n in HOSTS}, resumed.report()
    assert "resumed every node from the checkpoint of step" in resumed.text("lab")
    assert_weights_equal(expected, tmp_path / "cut")


# -- dial-out nodes and moving peers (loopback, launcher) --------------------------------------------
@pytest.mark.slow
def test_dial_out_nodes_follow_a_peer_to_its_standby_and_come_back_from_anywhere(tmp_path):
    """A five-party chain whose relay_1 and relay_3 only dial out. relay_2 (inbound) dies and its
    replacement binds its standby endpoint: both dial-out neighbours connect to it there. Then the
    dial-out relay_1 dies: restarted (a new process, a new route) it connects again. The weights equal
    those of an uninterrupted run."""
    from support.processes import assert_same_weights as same, chaos_topology, kill_at, saved_weights as weights, train
    path = chaos_topology(tmp_path, "multi_hop.yaml", standby=True, steps=16)
    document = yaml.safe_load(path.read_text())
    for node in document["nodes"]:
        if node["name"] in ("relay_1", "relay_3"):
            node.pop("endpoint"), node.pop("standby")
            node["inbound"] = False
        elif node["name"] != "relay_2":
            node.pop("standby")
    path.write_text(yaml.safe_dump(document))
    train(path, tmp_path / "clean")
    first, second = kill_at("relay_2", 4), kill_at("relay_1", 11)
    summary, run = train(path, tmp_path / "chaos", lambda r, row: (first(r, row), second(r, row)))
    assert run.restarts == {"relay_2": 1, "relay_1": 1}
    restart = next(e for e in run.events if e["event"] == "restart" and e["node"] == "relay_2")
    relay = next(n for n in yaml.safe_load((tmp_path / "chaos" / "topology.yaml").read_text())["nodes"]
                 if n["name"] == "relay_2")
    assert restart["endpoint"] == relay["standby"][0]
    assert summary["failovers"] == 2
    same(weights(tmp_path / "chaos"), weights(tmp_path / "clean"))


@pytest.mark.slow
def test_a_dial_out_coordinator_drives_inbound_nodes(tmp_path):
    """The label holder behind the firewall: the lab (coordinator) dials out to both hospitals, and its
    control messages to its own node never leave the process."""
    document = yaml.safe_load((ROOT / "topologies" / "vertical.yaml").read_text())
    for node in document["nodes"]:
        node.pop("metrics_port", None)
        if node["name"] == "lab":
            node.pop("endpoint")
            node["inbound"] = False
    document["training"]["epochs"] = 4
    path = tmp_path / "vertical.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    done = subprocess.run([*MESHSL, "run", str(path), "--free-ports", "--no-progress", "--run-dir",
                           str(tmp_path / "run"), "--summary-json", str(tmp_path / "summary.json")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT / "topologies")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["tasks"]["cancer"]["eval"]["accuracy"] >= 0.9
