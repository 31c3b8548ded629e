"""Typed control messages: one frozen dataclass per control kind, parsed from `Envelope.meta`.

Tensor headers are checked field by field (envelope.py); control messages get the same treatment here.
`parse(envelope)` returns the message object or raises ProtocolError with a bounded reason
(`bad_control`), which the receiving node counts and drops: a malformed control message never takes
a node down. The round a message belongs to travels in `Envelope.step`, not in the meta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, TypeVar

from meshsl.errors import ProtocolError
from meshsl.protocol.envelope import Envelope, Kind

Meta = dict[str, Any]  # a control message's JSON object, as it crosses the wire
MAX_LANES = 1 << 20
MAX_COUNT = 1 << 31
MAX_TEXT = 4096


def _bad(kind: Kind, detail: str) -> ProtocolError:
    return ProtocolError("bad_control", f"{kind.value}: {detail}")


def _int(kind: Kind, meta: Meta, key: str, default: Optional[int] = None, low: int = 0,
         high: int = MAX_COUNT) -> int:
    value = meta.get(key, default)
    if value is None:
        raise _bad(kind, f"needs {key!r}")
    if type(value) is not int or not low <= value <= high:
        raise _bad(kind, f"{key!r} must be an integer in [{low}, {high}], not {str(value)[:40]!r}")
    return value


def _optional_int(kind: Kind, meta: Meta, key: str) -> Optional[int]:
    return None if meta.get(key) is None else _int(kind, meta, key)


def _bool(kind: Kind, meta: Meta, key: str, default: bool = False) -> bool:
    value = meta.get(key, default)
    if type(value) is not bool:
        raise _bad(kind, f"{key!r} must be true or false")
    return value


def _text(kind: Kind, meta: Meta, key: str, default: Optional[str] = None) -> str:
    value = meta.get(key, default)
    if value is None:
        raise _bad(kind, f"needs {key!r}")
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise _bad(kind, f"{key!r} must be a string of at most {MAX_TEXT} characters")
    return value


def _lanes(kind: Kind, meta: Meta, key: str = "lanes") -> tuple[int, ...]:
    value = meta.get(key)
    if not isinstance(value, list) or not value or len(value) > MAX_LANES or \
            any(type(v) is not int or v < 0 for v in value):
        raise _bad(kind, f"{key!r} must be a non-empty list of lane numbers")
    return tuple(value)


class ControlMessage:
    kind: ClassVar[Kind]

    @classmethod
    def from_meta(cls, meta: Any) -> "ControlMessage":
        if not isinstance(meta, dict):
            raise _bad(cls.kind, "meta must be an object")
        return cls._parse(meta)

    @classmethod
    def _parse(cls, meta: Meta) -> "ControlMessage":
        return cls()

    def to_meta(self) -> Meta:
        return {}


# ---- coordinator -> node ------------------------------------------------------------------------
@dataclass(frozen=True)
class Begin(ControlMessage):
    """Start one round the coordinator drives itself: evaluation or prediction (training uses Run)."""
    kind: ClassVar[Kind] = Kind.BEGIN
    lanes: tuple[int, ...]
    micro_batches: int
    epoch: int = 0
    train_step: int = 0
    step_in_epoch: int = 0
    offset: int = 0  # predict: first input row of the round
    count: int = 0  # predict: input rows in the round

    @classmethod
    def _parse(cls, meta: Meta) -> "Begin":
        k = cls.kind
        return cls(lanes=_lanes(k, meta), micro_batches=_int(k, meta, "micro_batches", low=1),
                   epoch=_int(k, meta, "epoch", 0), train_step=_int(k, meta, "train_step", 0),
                   step_in_epoch=_int(k, meta, "step_in_epoch", 0), offset=_int(k, meta, "offset", 0),
                   count=_int(k, meta, "count", 0))

    def to_meta(self) -> Meta:
        return {"lanes": list(self.lanes), "micro_batches": self.micro_batches, "epoch": self.epoch,
                "train_step": self.train_step, "step_in_epoch": self.step_in_epoch, "offset": self.offset,
                "count": self.count}


@dataclass(frozen=True)
class Run(ControlMessage):
    """Train steps [first_step, first_step + count) without waiting for the coordinator between them.

    The round of step `first_step + i` is `Envelope.step + 1 + i`. `checkpoint`: save the checkpoint of
    that many committed steps before starting (one deferred past a weight-changing barrier: FedAvg or a
    sequential hand-off). `hold_checkpoint`: the last step of this run ends at such a barrier, so its
    checkpoint is not written when the step is applied (the next Run asks for it)."""
    kind: ClassVar[Kind] = Kind.RUN
    first_step: int
    count: int
    micro_batches: int
    checkpoint: Optional[int] = None
    hold_checkpoint: bool = False
    dropped_lanes: tuple[int, ...] = ()  # clients dropped from the run (clients.on_loss: drop): not trained

    @classmethod
    def _parse(cls, meta: Meta) -> "Run":
        k = cls.kind
        dropped = _lanes(k, meta, "dropped_lanes") if meta.get("dropped_lanes") else ()
        return cls(first_step=_int(k, meta, "first_step"), count=_int(k, meta, "count", low=1),
                   micro_batches=_int(k, meta, "micro_batches", low=1), checkpoint=_optional_int(k, meta, "checkpoint"),
                   hold_checkpoint=_bool(k, meta, "hold_checkpoint"), dropped_lanes=dropped)

    def to_meta(self) -> Meta:
        meta: Meta = {"first_step": self.first_step, "count": self.count, "micro_batches": self.micro_batches,
                "hold_checkpoint": self.hold_checkpoint}
        if self.checkpoint is not None:
            meta["checkpoint"] = self.checkpoint
        if self.dropped_lanes:
            meta["dropped_lanes"] = list(self.dropped_lanes)
        return meta


@dataclass(frozen=True)
class Commit(ControlMessage):
    """Every node applied the step of round `Envelope.step` (phase two of the step commit)."""
    kind: ClassVar[Kind] = Kind.COMMIT


@dataclass(frozen=True)
class Abort(ControlMessage):
    """Drop the rounds in progress and wait for a Restore."""
    kind: ClassVar[Kind] = Kind.ABORT


@dataclass(frozen=True)
class Restore(ControlMessage):
    """Load the checkpoint of `checkpoint` committed steps; the next round is after `round`; training
    resumes at step `checkpoint` (with the same micro-batches as before, so a replay is exact)."""
    kind: ClassVar[Kind] = Kind.RESTORE
    checkpoint: int
    round: int
    endpoints: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _parse(cls, meta: Meta) -> "Restore":
        k = cls.kind
        endpoints = meta.get("endpoints") or {}
        if not isinstance(endpoints, dict) or len(endpoints) > MAX_LANES or \
                any(not isinstance(n, str) or not isinstance(e, str) or len(e) > MAX_TEXT for n, e in endpoints.items()):
            raise _bad(k, "'endpoints' must map node names to endpoint strings")
        return cls(checkpoint=_int(k, meta, "checkpoint"), round=_int(k, meta, "round"), endpoints=dict(endpoints))

    def to_meta(self) -> Meta:
        return {"checkpoint": self.checkpoint, "round": self.round, "endpoints": dict(self.endpoints)}


@dataclass(frozen=True)
class WeightsPull(ControlMessage):
    kind: ClassVar[Kind] = Kind.WEIGHTS_PULL
    segment: str

    @classmethod
    def _parse(cls, meta: Meta) -> "WeightsPull":
        return cls(segment=_text(cls.kind, meta, "segment"))

    def to_meta(self) -> Meta:
        return {"segment": self.segment}


@dataclass(frozen=True)
class Shutdown(ControlMessage):
    """End of the run; `abort` (the coordinator's error) makes every node exit non-zero without weights."""
    kind: ClassVar[Kind] = Kind.SHUTDOWN
    abort: Optional[str] = None
    dropped: Optional[str] = None  # this client was dropped and not readmitted: it holds no final weights

    @classmethod
    def _parse(cls, meta: Meta) -> "Shutdown":
        return cls(abort=None if meta.get("abort") is None else _text(cls.kind, meta, "abort"),
                   dropped=None if meta.get("dropped") is None else _text(cls.kind, meta, "dropped"))

    def to_meta(self) -> Meta:
        meta = {} if self.abort is None else {"abort": self.abort}
        if self.dropped is not None:
            meta["dropped"] = self.dropped
        return meta


# ---- node -> coordinator ------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello(ControlMessage):
    """A node is up: its process (`incarnation`, a new token per process start), the checkpoint steps
    it holds, where it listens (None: a dial-out node binds nothing) and its prediction input's rows."""
    kind: ClassVar[Kind] = Kind.HELLO
    checkpoints: tuple[int, ...] = ()
    endpoint: Optional[str] = None
    incarnation: str = ""
    predict_rows: Optional[int] = None
    pid: Optional[int] = None  # the node's process id (a launcher's exit report names it)

    @classmethod
    def _parse(cls, meta: Meta) -> "Hello":
        k = cls.kind
        steps = meta.get("checkpoints", [])
        if not isinstance(steps, list) or len(steps) > MAX_LANES or any(type(s) is not int or s < 0 for s in steps):
            raise _bad(k, "'checkpoints' must be a list of step numbers")
        endpoint = None if meta.get("endpoint") is None else _text(k, meta, "endpoint")
        return cls(checkpoints=tuple(steps), endpoint=endpoint, incarnation=_text(k, meta, "incarnation", ""),
                   predict_rows=_optional_int(k, meta, "predict_rows"), pid=_optional_int(k, meta, "pid"))

    def to_meta(self) -> Meta:
        meta: Meta = {"checkpoints": list(self.checkpoints), "endpoint": self.endpoint, "incarnation": self.incarnation}
        if self.predict_rows is not None:
            meta["predict_rows"] = self.predict_rows
        if self.pid is not None:
            meta["pid"] = self.pid
        return meta


@dataclass(frozen=True)
class Ack(ControlMessage):
    """An acknowledgement `of` hello (coordinator -> node), or of checkpoint, restore, weights (node ->
    coordinator; `checkpoint`: the step written, `segment`: the weights loaded)."""
    kind: ClassVar[Kind] = Kind.ACK
    of: str
    checkpoint: Optional[int] = None
    segment: str = ""

    @classmethod
    def _parse(cls, meta: Meta) -> "Ack":
        k = cls.kind
        return cls(of=_text(k, meta, "of"), checkpoint=_optional_int(k, meta, "checkpoint"),
                   segment=_text(k, meta, "segment", ""))

    def to_meta(self) -> Meta:
        meta: Meta = {"of": self.of}
        if self.checkpoint is not None:
            meta["checkpoint"] = self.checkpoint
        if self.segment:
            meta["segment"] = self.segment
        return meta


def _number_map(kind: Kind, meta: Meta, key: str, finite: bool = True) -> Meta:
    """{name: number}: byte and refusal counts (finite), measured figures per edge (NaN allowed: a
    gauge of a constant input has no value, and says so)."""
    if key not in meta:
        return {}
    value = meta[key]
    if not isinstance(value, dict) or len(value) > MAX_LANES or any(
            not isinstance(n, str) or isinstance(v, bool) or not isinstance(v, (int, float))
            or (finite and not math.isfinite(v)) for n, v in value.items()):
        raise _bad(kind, f"{key!r} must map names to {'finite ' if finite else ''}numbers")
    return dict(value)


def _seconds(kind: Kind, meta: Meta, key: str) -> float:
    value = meta.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _bad(kind, f"{key!r} must be a non-negative number of seconds")
    return float(value)


def _task_stats(kind: Kind, meta: Meta) -> Meta:
    tasks = meta.get("tasks", {})
    if not isinstance(tasks, dict) or any(not isinstance(v, dict) for v in tasks.values()):
        raise _bad(kind, "'tasks' must map task names to statistics")
    for stats in tasks.values():
        for key in ("count", "correct"):
            if key in stats and (type(stats[key]) is not int or stats[key] < 0):
                raise _bad(kind, f"task statistic {key!r} must be a non-negative integer")
        loss = stats.get("loss_sum", 0.0)
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
            raise _bad(kind, "task statistic 'loss_sum' must be a finite number")
    return tasks


@dataclass(frozen=True)
class Done(ControlMessage):
    """A node finished its part of a round (training: and applied its optimizer step), with its
    statistics, each checked for shape here so that the coordinator can sum them without guards."""
    kind: ClassVar[Kind] = Kind.DONE
    checkpoint: Optional[int] = None  # training: the checkpoint written after this step, if any
    tasks: dict[str, Any] = field(default_factory=dict)  # task -> {count, correct, loss_sum} (eval: metrics, by_lane)
    leakage: dict[str, Any] = field(default_factory=dict)  # cut edge -> sampled dCor(raw input, activation)
    label_leakage: dict[str, Any] = field(default_factory=dict)  # cut edge -> realistic label-attack AUC
    label_leakage_upper_bound: dict[str, Any] = field(default_factory=dict)  # cut edge -> its upper bound
    bytes: dict[str, Any] = field(default_factory=dict)  # "edge|direction" -> bytes sent or received
    rejected: dict[str, Any] = field(default_factory=dict)  # reason -> messages refused
    compute_seconds: float = 0.0
    wall_seconds: float = 0.0
    predicted: dict[str, Any] = field(default_factory=dict)  # predict: task -> rows written at the output's owner
    hijack_check: Optional[dict[str, Any]] = None  # the training-hijacking probe's verdict
    privacy_spent: Optional[dict[str, Any]] = None  # label DP: epsilon spent so far

    @classmethod
    def _parse(cls, meta: Meta) -> "Done":
        k = cls.kind
        optional = {}
        for key in ("hijack_check", "privacy_spent"):
            if meta.get(key) is not None:
                if not isinstance(meta[key], dict):
                    raise _bad(k, f"{key!r} must be an object")
                optional[key] = meta[key]
        predicted = _number_map(k, meta, "predicted")
        if any(type(n) is not int or n < 0 for n in predicted.values()):
            raise _bad(k, "'predicted' must map tasks to row counts")
        figures = {key: _number_map(k, meta, key, finite=False)
                   for key in ("leakage", "label_leakage", "label_leakage_upper_bound")}
        return cls(checkpoint=_optional_int(k, meta, "checkpoint"), tasks=_task_stats(k, meta),
                   bytes=_number_map(k, meta, "bytes"), rejected=_number_map(k, meta, "rejected"),
                   compute_seconds=_seconds(k, meta, "compute_seconds"), wall_seconds=_seconds(k, meta, "wall_seconds"),
                   predicted=predicted, **figures, **optional)

    def to_meta(self) -> Meta:
        meta = {key: getattr(self, key) for key in ("tasks", "leakage", "label_leakage", "label_leakage_upper_bound",
                                                    "bytes", "rejected", "predicted", "hijack_check", "privacy_spent")
                if getattr(self, key)}
        meta.update(compute_seconds=self.compute_seconds, wall_seconds=self.wall_seconds)
        if self.checkpoint is not None:
            meta["checkpoint"] = self.checkpoint
        return meta


@dataclass(frozen=True)
class Failed(ControlMessage):
    kind: ClassVar[Kind] = Kind.FAILED
    error: str = ""

    @classmethod
    def _parse(cls, meta: Meta) -> "Failed":
        error = meta.get("error", "")
        return cls(error=str(error)[:500])

    def to_meta(self) -> Meta:
        return {"error": self.error}


@dataclass(frozen=True)
class Weights(ControlMessage):
    """A segment's weights in the tensor frames: a node's reply to WeightsPull, or (`load`) the
    coordinator's weights for a node to load (`fresh_optimizer`: a readmitted client starts afresh)."""
    kind: ClassVar[Kind] = Kind.WEIGHTS
    segment: str
    load: bool = False
    fresh_optimizer: bool = False

    @classmethod
    def _parse(cls, meta: Meta) -> "Weights":
        k = cls.kind
        return cls(segment=_text(k, meta, "segment"), load=_bool(k, meta, "load"),
                   fresh_optimizer=_bool(k, meta, "fresh_optimizer"))

    def to_meta(self) -> Meta:
        meta: Meta = {"segment": self.segment}
        if self.load:
            meta["load"] = True
        if self.fresh_optimizer:
            meta["fresh_optimizer"] = True
        return meta


@dataclass(frozen=True)
class Heartbeat(ControlMessage):
    """I am alive; from the coordinator's node it names that process (`incarnation`), so a peer that
    sees a new one (a standby took over) announces itself again."""
    kind: ClassVar[Kind] = Kind.HEARTBEAT
    incarnation: str = ""

    @classmethod
    def _parse(cls, meta: Meta) -> "Heartbeat":
        return cls(incarnation=_text(cls.kind, meta, "incarnation", ""))

    def to_meta(self) -> Meta:
        return {"incarnation": self.incarnation} if self.incarnation else {}


MESSAGES: dict[Kind, type[ControlMessage]] = {cls.kind: cls for cls in (
    Begin, Run, Commit, Abort, Restore, WeightsPull, Shutdown, Hello, Ack, Done, Failed, Weights, Heartbeat)}


M = TypeVar("M", bound=ControlMessage)


def parse_as(envelope: Envelope, cls: type[M]) -> M:
    """The envelope's message, which must be a `cls` (ProtocolError otherwise: a peer's mistake)."""
    message = parse(envelope)
    if not isinstance(message, cls):
        raise ProtocolError("bad_kind", f"{envelope.kind.value} is not a {cls.__name__} message")
    return message


def parse(envelope: Envelope) -> Optional[ControlMessage]:
    """The typed message of a control envelope (None for the tensor kinds: activations and gradients)."""
    cls = MESSAGES.get(envelope.kind)
    return None if cls is None else cls.from_meta(envelope.meta)


__all__ = ["Abort", "Ack", "Begin", "Commit", "ControlMessage", "Done", "Failed", "Hello", "MESSAGES", "Restore",
           "Run", "Shutdown", "Weights", "WeightsPull", "Heartbeat", "parse", "parse_as"]
