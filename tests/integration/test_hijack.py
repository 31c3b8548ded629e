"""Training-hijacking detection: a client on real digits data probes its server with fake batches
(random labels). An honest server trains the task; an FSHA-style server (Pasquini et al. 2021) ignores
the labels and sends gradients from a discriminator that pulls the client's features towards its own
pilot encoder's. In-process: the client and each server are plain torch modules."""
import pytest
import torch
from torch import nn

from meshsl.data import load_dataset
from meshsl.data.specs import DatasetSpec
from meshsl.privacy.hijack import SplitGuard


def digits():
    table = load_dataset(DatasetSpec(name="digits"), ".")
    x, y = torch.as_tensor(table.features), torch.as_tensor(table.labels)  # pixels in [0, 1]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half = len(x) // 2
    return x[order[:half]], y[order[:half]], x[order[half:]]  # the client's rows, and the server's public data


class HonestServer:
    def __init__(self):
        torch.manual_seed(1)
        self.top = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        self.optimizer = torch.optim.Adam(self.top.parameters(), 1e-3)

    def gradient(self, activation, labels):
        activation = activation.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(self.top(activation), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return activation.grad


class FSHAServer:
    """Feature-space hijacking: an autoencoder (pilot, decoder) on public data, and a discriminator whose
    adversarial gradient makes the client's outputs look like the pilot's (so the decoder inverts them)."""

    def __init__(self, public):
        torch.manual_seed(2)
        self.public = public
        self.pilot = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
        self.decoder = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))
        self.critic = nn.Sequential(nn.Linear(32, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
        self.autoencoder_opt = torch.optim.Adam([*self.pilot.parameters(), *self.decoder.parameters()], 1e-3)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), 1e-3)
        self.generator = torch.Generator().manual_seed(3)

    def gradient(self, activation, labels):  # the labels are ignored: no task is trained
        bce = nn.functional.binary_cross_entropy_with_logits
        public = self.public[torch.randint(0, len(self.public), (len(activation),), generator=self.generator)]
        loss = nn.functional.mse_loss(self.decoder(self.pilot(public)), public)
        self.autoencoder_opt.zero_grad()
        loss.backward()
        self.autoencoder_opt.step()
        ones, zeros = torch.ones(len(activation), 1), torch.zeros(len(activation), 1)
        loss = bce(self.critic(self.pilot(public).detach()), ones) + bce(self.critic(activation), zeros)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        activation = activation.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(bce(self.critic(activation), ones), activation)
        return grad


def train_client(server_kind: str, seed: int, steps: int = 150) -> dict:
    x, y, public = digits()
    torch.manual_seed(seed)
    client = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    optimizer = torch.optim.Adam(client.parameters(), 1e-3)
    server = HonestServer() if server_kind == "honest" else FSHAServer(public)
    guard = SplitGuard(seed=seed)
    batches = torch.Generator().manual_seed(seed + 10)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (64,), generator=batches)
        fake = guard.next_is_fake()
        labels = guard.fake_labels(y[rows], 10) if fake else y[rows]
        activation = client(x[rows])
        grad = server.gradient(activation.detach(), labels)
        optimizer.zero_grad()
        activation.backward(grad)
        guard.observe(torch.cat([p.grad.reshape(-1) for p in client.parameters()]), fake)
        if not fake:  # a probe's gradient never updates the client
            optimizer.step()
    return guard.verdict()


@pytest.mark.parametrize("seed", [0])
def test_fsha_server_is_detected_and_an_honest_one_is_not(seed):
    honest = train_client("honest", seed)
    hijacked = train_client("fsha", seed)
    assert honest["decided"] and hijacked["decided"]
    assert not honest["hijacked"], honest
    assert hijacked["hijacked"], hijacked
    assert honest["score"] > hijacked["score"] + 0.15


def test_no_verdict_before_enough_probes():
    guard = SplitGuard(warmup=3, min_fake=5)
    assert not any(guard.next_is_fake() for _ in range(3))
    assert guard.verdict() == {"score": None, "fake_batches": 0, "regular_batches": 0, "decided": False,
                               "hijacked": False}


# -- inside the runtime: U-shaped digits, the clinic probes the cloud ------------------------------
def u_shaped_topology():
    from pathlib import Path

    import yaml

    from meshsl.config.loader import parse_spec
    from meshsl.topology.model import topology_from_spec
    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "topologies" / "u_shaped.yaml").read_text())
    for node in doc["nodes"]:
        node.pop("metrics_port", None)
    doc["privacy"] = [{"segment": "encoder", "hijack_check": {"seed": 3}}]
    doc["training"].update(steps=80, micro_batches=1)
    return topology_from_spec(parse_spec(doc), "u.yaml", root / "topologies")


def run_u_shaped(monkeypatch, hijack: bool) -> dict:
    import asyncio

    from meshsl.apps.audit import quiet_copy
    from meshsl.compute.worker import SegmentWorker
    from meshsl.coordinator.runtime import RunOptions
    from meshsl.launch.simulate import simulate
    if hijack:  # the cloud ignores what comes back from the head and sends a critic's gradient instead
        torch.manual_seed(5)
        critic = nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
        original = SegmentWorker.backward

        def hijacking(self, segment, lane, micro_batch):
            key = (self.context.round, segment, lane, micro_batch)  # the stash is kept per round (staleness)
            leaf = self.stash[key].leaves.get("encoder") if self.node == "cloud" else None
            original(self, segment, lane, micro_batch)
            if leaf is not None:
                z = leaf.detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(nn.functional.softplus(-critic(z)).mean(), z)
                self.store.outgoing_grads[(self.context.round, "encoder", segment, lane, micro_batch)] = grad

        monkeypatch.setattr(SegmentWorker, "backward", hijacking)
    topology = u_shaped_topology()
    summary, _ = asyncio.run(simulate(quiet_copy(topology), RunOptions(evaluate=False)))
    return summary["hijack_check"]["clinic"]


def test_runtime_probe_flags_a_hijacking_server_and_not_an_honest_one(monkeypatch):
    honest = run_u_shaped(monkeypatch, hijack=False)
    assert honest["decided"] and not honest["hijacked"], honest
    assert honest["segments"] == ["encoder"] and honest["fake_batches"] >= 5
    hijacked = run_u_shaped(monkeypatch, hijack=True)
    assert hijacked["decided"] and hijacked["hijacked"], hijacked


def test_hijack_check_needs_the_labels_at_the_client():
    from pathlib import Path

    import yaml

    from meshsl.config.loader import parse_spec
    from meshsl.errors import ConfigError
    from meshsl.topology.model import topology_from_spec
    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "topologies" / "vanilla.yaml").read_text())
    doc["privacy"] = [{"segment": "bottom", "hijack_check": {}}]
    with pytest.raises(ConfigError, match=r"privacy\[0\]\.hijack_check: .*must hold the labels"):
        topology_from_spec(parse_spec(doc), "v.yaml", root / "topologies")
