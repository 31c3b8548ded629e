"""The privacy promise, checked on the wire: every message of every example configuration is
recorded at the transport and decoded as its receiver would; nothing but the declared cut-edge
activations/gradients (and, in multi-client modes, client-segment weights) crosses a party boundary,
no raw feature row or label of any party appears, and what crossed is exactly `meshsl plan`'s
privacy contract. The detectors are shown to fire on deliberately leaking traffic."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meshsl.apps.audit_wire import (TENSOR_KINDS, WireAudit, WireRecorder, contract, contract_shapes, holdings,
                               observed)
from meshsl.plans.explain import plan_document
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.protocol.frames import describe, encode_message
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.topology.model import load_topology

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"
EXAMPLES = ["vanilla", "u_shaped", "vertical", "vertical_u_shaped", "multi_task", "multi_hop",
            "multi_hop_multi_task", "splitfed", "sequential", "vertical_psi"]
_RUNS: dict[str, tuple] = {}


def recorded(name: str):
    """One epoch of training plus evaluation, in process, every message recorded (cached per module)."""
    if name not in _RUNS:
        topology = load_topology(TOPOLOGIES / f"{name}.yaml")
        recorder = WireRecorder(topology)
        summary, _ = asyncio.run(simulate(topology, RunOptions(epochs=1), traffic_hook=recorder))
        _RUNS[name] = (topology, recorder, summary)
    return _RUNS[name]


@pytest.mark.parametrize("name", EXAMPLES)
def test_wire_audit_is_green(name):
    topology, recorder, _ = recorded(name)
    crossing = recorder.crossing
    assert crossing, "nothing crossed a party boundary"
    kinds = {m.envelope.kind for m in crossing}
    assert {Kind.ACTIVATION, Kind.GRADIENT} <= kinds
    findings = WireAudit(topology).check(recorder.messages)
    assert not findings, "\n".join(map(str, findings[:10]))
    # (c) tensors cross only on cut edges (or as client-segment weights in multi-client modes).
    cut = {f"{p}->{c}" for p, c in topology.cut_edges()}
    for m in crossing:
        if m.tensors and m.envelope.kind in TENSOR_KINDS:
            assert m.envelope.edge in cut
        elif m.tensors:
            assert m.envelope.kind == Kind.WEIGHTS and topology.spec.clients is not None
    if topology.spec.clients is not None:
        assert Kind.WEIGHTS in kinds  # FedAvg / hand-off happened within the audited epoch


@pytest.mark.parametrize("name", EXAMPLES)
def test_plan_contract_equals_the_wire(name):
    """`meshsl plan`'s contract lists exactly the (sender, receiver, edge, direction) seen on the wire."""
    topology, recorder, _ = recorded(name)
    document = plan_document(topology)
    printed = {(node, t["peer"], t["edge"], t["direction"]) for node, p in document["nodes"].items() for t in p["sends"]}
    received = {(t["peer"], node, t["edge"], t["direction"]) for node, p in document["nodes"].items()
                for t in p["receives"]}
    assert printed == received == contract(topology)
    assert observed(recorder.messages) == printed
    shapes = contract_shapes(topology)
    for m in recorder.messages:
        if m.envelope.kind in TENSOR_KINDS:
            shape, dtype = shapes[(m.sender, m.peer, m.envelope.edge, TENSOR_KINDS[m.envelope.kind])]
            assert tuple(m.tensors[0].shape[1:]) == shape and m.envelope.tensors[0].dtype == dtype
    # Party view: every party sends/receives only what its contract rows say.
    parties = {(topology.nodes[s].party, e, d) for s, _, e, d in observed(recorder.crossing)}
    contract_parties = {(p["party"], t["edge"], t["direction"]) for p in document["nodes"].values()
                        for t in p["sends"] if t["peer_party"] != p["party"]}
    assert parties == contract_parties


@pytest.mark.parametrize("name", ["u_shaped", "vertical_u_shaped"])
def test_u_shaped_server_never_sees_labels_logits_or_loss(name):
    topology, recorder, _ = recorded(name)
    label_party = topology.party_of(topology.spec.tasks[0].labels)
    head = topology.spec.tasks[0].output
    classes = topology.num_classes[topology.spec.tasks[0].labels]
    server_parties = {topology.party_of(s) for s in topology.segments} - {topology.party_of(d) for d in topology.data}
    assert server_parties
    to_server = [m for m in recorder.messages if m.peer_party in server_parties]
    assert to_server
    assert topology.party_of(head) == label_party  # the loss runs where the labels are
    for m in to_server:
        e = m.envelope
        assert "tasks" not in e.meta and "loss" not in json.dumps(e.meta)
        if e.kind == Kind.GRADIENT:
            # Only the gradient w.r.t. the server's own output comes back (body->head), never logits.
            producer = e.edge.split("->")[0]
            assert topology.party_of(producer) in server_parties
            assert tuple(m.tensors[0].shape[1:]) == topology.shapes[producer] != (classes,)
        elif e.kind == Kind.ACTIVATION:
            assert topology.party_of(e.edge.split("->")[1]) in server_parties  # inputs of its own segment
        else:
            assert not m.tensors
        assert all(t.is_floating_point() for t in m.tensors)


def test_multi_client_summary_has_per_client_metrics():
    topology, _, summary = recorded("sequential")
    by_client = summary["tasks"]["digit"]["eval"]["by_client"]
    assert sorted(by_client) == [f"clinic{i}" for i in range(4)]
    assert all(m["samples"] == summary["tasks"]["digit"]["eval"]["by_client"]["clinic0"]["samples"]
               for m in by_client.values())


# ---- the detectors fire --------------------------------------------------------------------------
def _inject(recorder: WireRecorder, kind: Kind, sender: str, peer: str, tensor=None, edge: str = "", meta=None):
    tensors = () if tensor is None else (describe(tensor.dtype, tuple(tensor.shape), "none", [tensor]),)
    envelope = Envelope(kind=kind, topology=recorder.topology.hash, sender=sender, phase="train", step=1,
                        edge=edge, tensors=tensors, meta=meta or {})
    recorder(sender, peer, encode_message(envelope, [] if tensor is None else [[tensor.contiguous()]]))


@pytest.fixture(scope="module")
def vanilla():
    topology = load_topology(TOPOLOGIES / "vanilla.yaml")
    return topology, holdings(topology)


def _rules(topology, held, inject) -> set[str]:
    recorder = WireRecorder(topology)
    inject(recorder)
    return {f.rule for f in WireAudit(topology, held).check(recorder.messages)}


def test_detects_raw_feature_rows_by_value_and_by_bytes(vanilla):
    topology, held = vanilla
    pixels = torch.as_tensor(held.features["pixels"][1][10:26])
    # A raw micro-batch sent as the cut activation (what an identity client segment would do).
    assert "raw_features" in _rules(topology, held, lambda r: _inject(r, Kind.ACTIVATION, "client", "server",
                                                                    pixels, "bottom->top"))
    # A scaled copy is a leak too.
    assert "raw_features" in _rules(topology, held, lambda r: _inject(r, Kind.ACTIVATION, "client", "server",
                                                                    pixels * 0.01, "bottom->top"))
    # Raw bytes hidden inside a wider tensor (not row-aligned with the raw width): the byte search fires.
    hidden = torch.cat([torch.rand(16, 7), pixels, torch.rand(16, 9)], dim=1)
    assert "raw_features" in _rules(topology, held, lambda r: _inject(r, Kind.DONE, "client", "server", hidden))
    # Honest activations do not.
    honest = torch.relu(torch.randn(16, 64))
    assert _rules(topology, held, lambda r: _inject(r, Kind.ACTIVATION, "client", "server", honest, "bottom->top")) == set()


def test_detects_raw_features_from_a_leaking_client_segment(monkeypatch):
    """End to end: a client segment that forwards its input (plus a trainable no-op) leaks raw rows."""
    import meshsl.compute.worker as worker

    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + 0 * self.w

    real = worker.build_module
    monkeypatch.setattr(worker, "build_module", lambda t, s: Leaky() if s == "bottom" else real(t, s))
    topology = load_topology(TOPOLOGIES / "vanilla.yaml")
    recorder = WireRecorder(topology)
    asyncio.run(simulate(topology, RunOptions(steps=2, evaluate=False), traffic_hook=recorder))
    findings = WireAudit(topology).check(recorder.messages)
    assert any(f.rule == "raw_features" and "bottom->top" in f.message for f in findings)


def test_detects_labels(vanilla):
    topology, held = vanilla
    y = torch.as_tensor(held.labels["digit_labels"][1][:16])
    assert "labels" in _rules(topology, held, lambda r: _inject(r, Kind.GRADIENT, "server", "client",
                                                              y.to(torch.int64), "bottom->top"))
    smuggled = torch.relu(torch.randn(16, 64))
    smuggled[:, 5] = y.float()
    assert "labels" in _rules(topology, held, lambda r: _inject(r, Kind.GRADIENT, "server", "client",
                                                              smuggled, "bottom->top"))
    one_hot = torch.nn.functional.one_hot(y.long(), 10).float()
    assert "labels" in _rules(topology, held, lambda r: _inject(r, Kind.DONE, "server", "client", one_hot))


def test_detects_undeclared_edges_control_tensors_and_per_sample_meta(vanilla):
    topology, held = vanilla
    act = torch.relu(torch.randn(16, 64))
    # An activation in the wrong direction (server -> client) is not in the contract.
    assert "undeclared_edge" in _rules(topology, held, lambda r: _inject(r, Kind.ACTIVATION, "server", "client",
                                                                       act, "bottom->top"))
    assert "contract_shape" in _rules(topology, held, lambda r: _inject(r, Kind.ACTIVATION, "client", "server",
                                                                      torch.randn(16, 10), "bottom->top"))
    assert "tensor_in_control" in _rules(topology, held, lambda r: _inject(r, Kind.COMMIT, "server", "client", act))
    # Weights are refused outside multi-client modes.
    assert "tensor_in_control" in _rules(topology, held, lambda r: _inject(
        r, Kind.WEIGHTS, "client", "server", act, meta={"segment": "bottom"}))
    assert "per_sample_meta" in _rules(topology, held, lambda r: _inject(
        r, Kind.DONE, "client", "server", meta={"ids": list(range(64))}))


def test_detects_metrics_and_logits_sent_to_the_u_shaped_server():
    topology = load_topology(TOPOLOGIES / "u_shaped.yaml")
    held = holdings(topology)
    assert "label_free_party" in _rules(topology, held, lambda r: _inject(
        r, Kind.BEGIN, "clinic", "cloud", meta={"tasks": {"digit": {"loss": 0.3}}}))
    audit = WireAudit(topology, held)
    assert topology.spec.tasks[0].output == "head" and "head" in audit.task_outputs
    assert np.asarray(held.labels["digit_labels"][1]).max() == 9


# ---- sample-id alignment (PSI): no raw id crosses --------------------------------------------------
def test_psi_alignment_sends_only_blinded_points_and_counts():
    topology, recorder, _ = recorded("vertical_psi")
    crossing = [a for a in recorder.alignment if a.crosses_party]
    # 2 members x (request + response each way) + final: 10 messages, all across party boundaries.
    assert len(crossing) == 10
    assert {json.loads(a.frames[1])["type"] for a in crossing} == {"request", "response", "final"}
    assert WireAudit(topology).check_alignment(recorder) == []


def test_detects_raw_ids_in_alignment_and_training_messages():
    from meshsl.align.ids import source_ids
    from meshsl.align.session import encode as encode_alignment
    topology, recorder, _ = recorded("vertical_psi")
    patient = source_ids(topology, "features_a")[17]
    audit = WireAudit(topology)

    def rules(inject) -> set[str]:
        leaky = WireRecorder(topology)
        inject(leaky)
        return {f.rule for f in audit.check_alignment(leaky)}

    # An id sent in the clear as an alignment payload, inside a header, or hashed.
    import hashlib
    assert "raw_id" in rules(lambda r: r("hospital_a", "lab", encode_alignment("final", topology.hash,
                                                                               b"xx" + patient.encode())))
    assert "raw_id" in rules(lambda r: r("hospital_a", "lab", encode_alignment(
        "final", topology.hash, hashlib.sha256(patient.encode()).digest())))
    assert "raw_id" in rules(lambda r: _inject(r, Kind.DONE, "lab", "hospital_a", meta={"note": patient}))
    # A payload that is not blinded points, or a header with more than counts.
    assert "alignment_format" in rules(lambda r: r("lab", "hospital_b", encode_alignment("final", topology.hash,
                                                                                         b"not protobuf")))
    assert "alignment_format" in rules(lambda r: r("lab", "hospital_b", encode_alignment(
        "final", topology.hash, ids="x")))
    assert rules(lambda r: [r(a.sender, a.peer, a.frames) for a in recorder.alignment]) == set()
