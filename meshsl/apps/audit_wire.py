"""The split-learning privacy promise, checked on the wire.

`WireRecorder` is a transport hook (`simulate(..., traffic_hook=recorder)`, or wrap any transport's
`send`) that decodes every message exactly as a receiver would (`decode_message`, then the edge's
codec) and keeps a copy. `WireAudit` then checks what crossed a party boundary against the source
data and the plan:

- ``raw_features``: no row of any raw feature matrix (as the owning node loads it) appears in a
  message, neither as a tensor row (within a tiny tolerance, or as a scaled copy) nor as its float32
  bytes anywhere inside the frames;
- ``labels``: no integer tensor crosses, no tensor column is a label vector (integer values inside a
  label source's class range), no tensor is one-hot over a label source's classes;
- ``undeclared_edge`` / ``contract_shape``: every activation or gradient is one the privacy contract
  of `meshsl plan` declares for that (sender, receiver, edge, direction), with its shape and dtype;
- ``tensor_in_control``: control messages carry no tensors, except WEIGHTS of client segments
  between the coordinator and the clients in multi-client modes (SplitFed averaging and sequential
  hand-off move model parameters, never data: this is the one disclosure those protocols make);
- ``per_sample_meta``: no header meta carries a list indexed by sample (longer than the number of
  classes, clients or nodes);
- ``label_free_party``: a party without labels never receives task metrics or losses in a header,
  nor the output of a task's output segment (logits);
- ``raw_id`` (topologies with sample ids, `check_alignment`): no party's sample id, nor its SHA-256,
  appears in any frame of any message, alignment or training; ``alignment_format``: a PSI message
  is the magic tag, a header of counts only, and a payload of blinded P-256 points (nothing else).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch

from meshsl.align.ids import source_ids, uses_ids
from meshsl.align.psi import POINT_BYTES, response_values
from meshsl.align.session import MAGIC, is_alignment_message
from meshsl.protocol.compression import make_codec
from meshsl.models.layers import build_segment_module
from meshsl.data import load_source
from meshsl.plans.nodeplan import build_edges, build_plans
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.protocol.frames import TORCH_DTYPES, decode_message
from meshsl.launch.simulate import simulate

TENSOR_KINDS = {Kind.ACTIVATION: "activation", Kind.GRADIENT: "gradient"}
CONTROL_KINDS = {Kind.HELLO, Kind.BEGIN, Kind.DONE, Kind.COMMIT, Kind.ABORT, Kind.WEIGHTS_PULL, Kind.ACK,
                 Kind.HEARTBEAT, Kind.SHUTDOWN, Kind.FAILED, Kind.RESTORE, Kind.RUN}
META_LIST_EXEMPT = {"checkpoints"}  # HELLO: checkpoint step numbers the node holds (not sample data)


@dataclass
class WireMessage:
    """One message as its receiver decodes it."""

    sender: str
    peer: str
    sender_party: str
    peer_party: str
    envelope: Envelope
    tensors: list[torch.Tensor]  # logical tensors (decoded, copied)
    raw: bytes  # the tensor frames' bytes as sent

    @property
    def crosses_party(self) -> bool:
        return self.sender_party != self.peer_party

    def describe(self) -> str:
        e = self.envelope
        shapes = [tuple(t.shape) for t in self.tensors]
        return (f"{e.kind.value} {self.sender}({self.sender_party}) -> {self.peer}({self.peer_party}) "
                f"phase={e.phase} round={e.step} lane={e.lane} mb={e.micro_batch} edge={e.edge!r} tensors={shapes}")


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str  # WireMessage.describe()
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.message}: {self.detail}"


@dataclass
class AlignmentWire:
    """One message of the sample-id alignment (PSI), as sent."""

    sender: str
    peer: str
    sender_party: str
    peer_party: str
    frames: list[bytes]

    @property
    def crosses_party(self) -> bool:
        return self.sender_party != self.peer_party

    def describe(self) -> str:
        return (f"alignment {self.sender}({self.sender_party}) -> {self.peer}({self.peer_party}) "
                f"{self.frames[1][:120]!r} + {len(self.frames[-1])} payload bytes")


class WireRecorder:
    """A traffic hook: `recorder(sender, peer, frames)`; keeps every message, decoded."""

    def __init__(self, topology) -> None:
        self.topology = topology
        self.edges = build_edges(topology)
        self.max_bytes = topology.spec.security.max_message_bytes
        self.messages: list[WireMessage] = []
        self.alignment: list[AlignmentWire] = []  # PSI messages (topologies with sample ids)
        self.headers: list[bytes] = []  # every training message's header frame, for the raw-id rule

    def __call__(self, sender: str, peer: str, frames) -> None:
        nodes = self.topology.nodes
        if is_alignment_message(frames):
            self.alignment.append(AlignmentWire(sender, peer, nodes[sender].party, nodes[peer].party,
                                                [bytes(f) for f in frames]))
            return
        if nodes[sender].party != nodes[peer].party:
            self.headers.append(bytes(list(frames)[0]))
        envelope, parts = decode_message(list(frames), self.max_bytes)
        tensors = []
        for descriptor, tensor_parts in zip(envelope.tensors, parts):
            tensors.append(self._decode(envelope, descriptor, tensor_parts))
        raw = b"".join(bytes(f) for f in list(frames)[1:])
        self.messages.append(WireMessage(sender, peer, nodes[sender].party, nodes[peer].party,
                                         envelope, tensors, raw))

    def _decode(self, envelope: Envelope, descriptor, parts) -> torch.Tensor:
        dtype = TORCH_DTYPES[descriptor.dtype]
        spec = None
        edge = self.edges.get(envelope.edge)
        if edge is not None and envelope.kind in TENSOR_KINDS:
            spec = edge.forward_codec if envelope.kind == Kind.ACTIVATION else edge.backward_codec
        codec = make_codec({"codec": descriptor.codec} if descriptor.codec == "none" or spec is None
                           or spec.codec != descriptor.codec else spec)
        return codec.decode([p.clone() for p in parts], descriptor.shape, dtype)

    @property
    def crossing(self) -> list[WireMessage]:
        return [m for m in self.messages if m.crosses_party]


# ---- what the parties hold ----------------------------------------------------------------------
@dataclass
class Holdings:
    features: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # source -> (party, rows float32)
    labels: dict[str, tuple[str, np.ndarray, int]] = field(default_factory=dict)  # source -> (party, y, classes)


def holdings(topology) -> Holdings:
    """Every data source exactly as its node loads it (`NodeData`): float32 feature rows, labels."""
    held = Holdings()
    for name, spec in topology.data.items():
        table = load_source(spec, topology.base_dir)
        parties = sorted({topology.nodes[n].party for n in topology.placement[name]})
        if spec.kind == "labels":
            y = np.asarray(table.labels)
            classes = topology.num_classes.get(name) or int(np.max(y)) + 1
            held.labels[name] = (",".join(parties), y, int(classes))
        else:
            rows = np.ascontiguousarray(table.features, dtype=np.float32)
            held.features[name] = (",".join(parties), rows.reshape(rows.shape[0], -1))
    return held


def contract(topology) -> set[tuple[str, str, str, str]]:
    """(sender node, receiver node, edge, direction) of every tensor the plan declares."""
    return {(name, t.peer, t.edge, t.direction)
            for name, plan in build_plans(topology).items() for t in plan.sends}


def contract_shapes(topology) -> dict[tuple[str, str, str, str], tuple[tuple, str]]:
    return {(name, t.peer, t.edge, t.direction): (tuple(t.shape[1:]), t.dtype)
            for name, plan in build_plans(topology).items() for t in plan.sends}


def observed(messages: Iterable[WireMessage]) -> set[tuple[str, str, str, str]]:
    return {(m.sender, m.peer, m.envelope.edge, TENSOR_KINDS[m.envelope.kind])
            for m in messages if m.envelope.kind in TENSOR_KINDS}


# ---- the audit ----------------------------------------------------------------------------------
class WireAudit:
    def __init__(self, topology, held: Optional[Holdings] = None, tolerance: float = 1e-4) -> None:
        self.topology = topology
        self.held = held or holdings(topology)
        self.tolerance = tolerance
        self.contract = contract_shapes(topology)
        self.edges = build_edges(topology)
        self.label_parties = {p for parties, _, _ in self.held.labels.values() for p in parties.split(",")}
        self.task_outputs = {t.output for t in topology.spec.tasks}
        self.replicated = {s for s in topology.segments if topology.is_replicated(s)}
        classes = [c for _, _, c in self.held.labels.values()]
        self.meta_list_limit = max([*classes, topology.lanes, len(topology.nodes), 2])
        self._rows: dict[str, torch.Tensor] = {}
        self._row_bytes: dict[str, list[bytes]] = {}
        for name, (_, rows) in self.held.features.items():
            informative = [r for r in rows if len(np.unique(r)) >= 3]  # constant rows match dead ReLUs
            unique = {r.tobytes(): r for r in informative}
            self._row_bytes[name] = list(unique)
            self._rows[name] = torch.as_tensor(np.stack(list(unique.values()))) if unique else torch.empty(0)

    # -- entry point -----------------------------------------------------------------------------
    def check(self, messages: Iterable[WireMessage], crossing_only: bool = True) -> list[Finding]:
        messages = [m for m in messages if m.crosses_party or not crossing_only]
        findings: list[Finding] = []
        for m in messages:
            findings += self._kind_and_contract(m)
            findings += self._meta(m)
            for t in m.tensors:
                findings += self._raw_values(m, t)
                findings += self._labels(m, t)
            findings += self._label_free(m)
        findings += self._raw_bytes(messages)
        return findings

    def check_alignment(self, recorder: "WireRecorder") -> list[Finding]:
        """No sample id (raw or SHA-256) in any crossing frame; PSI messages hold only counts and points.

        Ids shorter than 6 bytes are not searched for: short strings turn up in random bytes by chance."""
        if not uses_ids(self.topology):
            return []
        ids = {v for name in self.topology.data for v in source_ids(self.topology, name)}
        needles = [v.encode() for v in ids if len(v.encode()) >= 6]
        needles += [hashlib.sha256(v.encode()).digest() for v in ids]
        needles += [hashlib.sha256(v.encode()).hexdigest().encode() for v in ids]
        findings: list[Finding] = []
        crossing = [a for a in recorder.alignment if a.crosses_party]
        for a in crossing:
            problem = None
            try:
                header = json.loads(a.frames[1])
                values = response_values(a.frames[2]) if a.frames[2] else []
                if len(a.frames) != 3 or a.frames[0] != MAGIC:
                    problem = f"{len(a.frames)} frames, tag {a.frames[0][:20]!r}"
                elif set(header) - {"type", "topology", "count", "size", "error"}:
                    problem = f"header keys {sorted(header)}"
                elif any(len(v) != POINT_BYTES for v in values):
                    problem = "a payload value is not a compressed P-256 point"
            except Exception as exc:  # noqa: BLE001 - anything unparseable is itself the finding
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                findings.append(Finding("alignment_format", a.describe(), problem))
        blobs = [(a.describe(), b"".join(a.frames)) for a in crossing]
        blobs += [(m.describe(), header + m.raw) for m, header in zip(recorder.crossing, recorder.headers)]
        separator = b"\xffMESHSL-AUDIT\xff"
        blob = separator.join(b for _, b in blobs)
        starts, position = [], 0
        for _, b in blobs:
            starts.append(position)
            position += len(b) + len(separator)
        for needle in needles:
            at = blob.find(needle)
            if at >= 0:
                index = max(i for i, s in enumerate(starts) if s <= at)
                findings.append(Finding("raw_id", blobs[index][0], "a sample id (or its SHA-256) is inside the frames"))
                break
        return findings

    # -- rules -----------------------------------------------------------------------------------
    def _kind_and_contract(self, m: WireMessage) -> list[Finding]:
        e = m.envelope
        if e.kind in TENSOR_KINDS:
            key = (m.sender, m.peer, e.edge, TENSOR_KINDS[e.kind])
            if key not in self.contract:
                return [Finding("undeclared_edge", m.describe(), f"{key} is not in the privacy contract")]
            shape, dtype = self.contract[key]
            bad = [tuple(t.shape) for t in m.tensors if tuple(t.shape[1:]) != shape or str(t.dtype) != f"torch.{dtype}"]
            if len(m.tensors) != 1 or bad:
                return [Finding("contract_shape", m.describe(), f"expected one {dtype} (micro_batch, {shape}) tensor")]
            return []
        if e.kind == Kind.WEIGHTS:
            return self._weights(m)
        if e.kind not in CONTROL_KINDS:
            return [Finding("unexpected_kind", m.describe(), f"kind {e.kind.value}")]
        if m.tensors:
            return [Finding("tensor_in_control", m.describe(), "control messages carry no tensors")]
        return []

    def _weights(self, m: WireMessage) -> list[Finding]:
        """Client-segment weights between the coordinator and a client (SplitFed FedAvg, sequential hand-off)."""
        segment = str(m.envelope.meta.get("segment"))
        coordinator = self.topology.coordinator
        if self.topology.spec.clients is None or segment not in self.replicated:
            return [Finding("tensor_in_control", m.describe(), f"weights of {segment!r} outside a multi-client mode")]
        other = m.peer if m.sender == coordinator else m.sender if m.peer == coordinator else None
        if other is None or other not in self.topology.placement[segment]:
            return [Finding("tensor_in_control", m.describe(), f"weights of {segment!r} not between the coordinator "
                                                               "and a client hosting it")]
        expected = [tuple(p.shape) for p in self._module_shapes(segment)]
        if [tuple(t.shape) for t in m.tensors] != expected:
            return [Finding("tensor_in_control", m.describe(), f"weights do not have the shapes of {segment!r}")]
        return []

    def _module_shapes(self, segment: str) -> list[torch.Tensor]:
        cache = self.__dict__.setdefault("_shapes", {})
        if segment not in cache:
            cache[segment] = list(build_segment_module(self.topology.segments[segment], segment).state_dict().values())
        return cache[segment]

    def _meta(self, m: WireMessage) -> list[Finding]:
        found = []

        def walk(value: Any, path: str) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    if k not in META_LIST_EXEMPT:
                        walk(v, f"{path}.{k}")
            elif isinstance(value, list):
                if len(value) > self.meta_list_limit:
                    found.append(Finding("per_sample_meta", m.describe(),
                                         f"meta{path} is a list of {len(value)} (> {self.meta_list_limit})"))
                for i, v in enumerate(value):
                    walk(v, f"{path}[{i}]")

        walk(m.envelope.meta, "")
        return found[:1]

    def _raw_values(self, m: WireMessage, t: torch.Tensor) -> list[Finding]:
        if not t.is_floating_point() or t.ndim == 0 or t.numel() == 0:
            return []
        flat = t.detach().float().reshape(t.shape[0], -1) if t.ndim > 1 else t.detach().float().reshape(1, -1)
        found = []
        for name, rows in self._rows.items():
            if rows.numel() == 0 or rows.shape[1] != flat.shape[1]:
                continue
            distance = torch.cdist(flat.double(), rows.double())
            scale = rows.double().norm(dim=1).clamp_min(1e-12)
            if bool((distance <= self.tolerance * scale).any()):
                found.append(Finding("raw_features", m.describe(), f"a row equals a raw row of {name!r}"))
                continue
            a = torch.nn.functional.normalize(flat.double(), dim=1)
            b = torch.nn.functional.normalize(rows.double(), dim=1)
            nonzero = (flat != 0).sum(dim=1) >= 3
            cosine = (a @ b.T)[nonzero]
            if cosine.numel() and float(cosine.max()) >= 1 - 1e-9:
                found.append(Finding("raw_features", m.describe(), f"a row is a scaled copy of a raw row of {name!r}"))
        return found

    def _raw_bytes(self, messages: list[WireMessage]) -> list[Finding]:
        """The float32 bytes of any raw row, anywhere in the frames (any offset, any tensor layout)."""
        separator = b"\xffMESHSL-AUDIT\xff"
        blob = separator.join(m.raw for m in messages)
        starts, position = [], 0
        for m in messages:
            starts.append(position)
            position += len(m.raw) + len(separator)
        found = []
        for name, needles in self._row_bytes.items():
            for needle in needles:
                at = blob.find(needle)
                if at >= 0:
                    index = max(i for i, s in enumerate(starts) if s <= at)
                    found.append(Finding("raw_features", messages[index].describe(),
                                         f"the float32 bytes of a raw row of {name!r} are inside the frames"))
                    break
        return found

    def _labels(self, m: WireMessage, t: torch.Tensor) -> list[Finding]:
        if t.numel() == 0:
            return []
        if not t.is_floating_point():
            if m.envelope.kind == Kind.WEIGHTS:
                return []  # integer buffers of a module (e.g. BatchNorm's num_batches_tracked)
            return [Finding("labels", m.describe(), f"an integer tensor ({t.dtype}) crossed")]
        flat = t.detach().reshape(t.shape[0], -1).double() if t.ndim > 1 else t.detach().reshape(-1, 1).double()
        if flat.shape[0] < 4 or m.envelope.kind == Kind.WEIGHTS:
            return []
        integral = (flat == flat.round()).all(dim=0)
        varied = flat.max(dim=0).values != flat.min(dim=0).values
        for name, (_, _, classes) in self.held.labels.items():
            column = integral & varied & (flat >= 0).all(dim=0) & (flat < classes).all(dim=0)
            if bool(column.any()):
                return [Finding("labels", m.describe(), f"a tensor column looks like the labels of {name!r}")]
            if flat.shape[1] == classes and bool(((flat == 0) | (flat == 1)).all()) and bool((flat.sum(1) == 1).all()):
                return [Finding("labels", m.describe(), f"a tensor is one-hot over the classes of {name!r}")]
        return []

    def _label_free(self, m: WireMessage) -> list[Finding]:
        """A party that holds no labels gets no task metrics, losses or logits."""
        if m.peer_party in self.label_parties:
            return []
        e = m.envelope
        found = []
        if _has_key(e.meta, {"tasks", "loss", "loss_sum", "accuracy", "correct"}):
            found.append(Finding("label_free_party", m.describe(), "task metrics or losses sent to a party without labels"))
        if e.kind in TENSOR_KINDS and e.edge in self.edges and self.edges[e.edge].producer in self.task_outputs:
            found.append(Finding("label_free_party", m.describe(), "the output of a task's output segment (logits)"))
        return found


def _has_key(value: Any, keys: set[str]) -> bool:
    if isinstance(value, dict):
        return any(k in keys or _has_key(v, keys) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_key(v, keys) for v in value)
    return False


def summarise(messages: list[WireMessage]) -> dict:
    """Counts per (kind, edge) of what crossed party boundaries: for reports and docs."""
    counts: dict[str, int] = {}
    for m in messages:
        if m.crosses_party:
            key = f"{m.envelope.kind.value}:{m.envelope.edge}" if m.envelope.edge else m.envelope.kind.value
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


async def audit_run(topology, options=None) -> tuple[dict, WireRecorder, list[Finding]]:
    """Train `topology` in process (simulate) while recording the wire; returns (summary, recorder, findings)."""
    recorder = WireRecorder(topology)
    summary, _ = await simulate(topology, options, traffic_hook=recorder)
    return summary, recorder, WireAudit(topology).check(recorder.messages)


__all__ = ["AlignmentWire", "Finding", "Holdings", "WireAudit", "WireMessage", "WireRecorder", "audit_run", "contract",
           "contract_shapes", "holdings", "observed", "summarise"]
