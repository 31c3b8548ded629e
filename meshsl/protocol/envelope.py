"""The message header: kind, topology hash, sender, step, micro-batch, edge and tensor descriptors.

Parsed by hand rather than with pydantic because it runs for every micro-batch; every field is
type- and range-checked, and anything else raises ProtocolError with a bounded `reason`.
"""
from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from meshsl.errors import ProtocolError

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 4096
MAX_DIMS = 8
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int32": 4, "int64": 8, "uint8": 1}


class Kind(str, enum.Enum):
    HELLO = "hello"          # node -> coordinator: I am up
    BEGIN = "begin"          # coordinator -> nodes: start a step (train), evaluation or prediction round
    ACTIVATION = "act"       # forward tensor on an edge
    GRADIENT = "grad"        # backward tensor on an edge
    DONE = "done"            # node -> coordinator: my part of the round is finished (with statistics)
    COMMIT = "commit"        # coordinator -> nodes: apply the optimizer for the step
    ABORT = "abort"          # coordinator -> nodes: drop the round's partial state
    WEIGHTS_PULL = "wpull"   # coordinator -> node: send me your segment weights
    WEIGHTS = "weights"      # node -> coordinator (or coordinator -> node: load these)
    ACK = "ack"              # generic acknowledgement of a control message
    HEARTBEAT = "hb"
    SHUTDOWN = "shutdown"
    FAILED = "failed"        # node -> coordinator: a fatal local error (message in meta)
    RESTORE = "restore"      # coordinator -> nodes: drop the round, load checkpoint step k, continue from round r
    RUN = "run"              # coordinator -> nodes: train steps i..j on your own (see docs/wan.md)


PHASES = ("train", "eval", "predict", "control")


@dataclass(frozen=True)
class TensorDescriptor:
    dtype: str
    shape: tuple[int, ...]
    codec: str
    parts: tuple[tuple[str, int], ...]  # (dtype, element count) of each raw frame

    def to_json(self) -> list[Any]:
        return [self.dtype, list(self.shape), self.codec, [list(p) for p in self.parts]]


_NO_META: Any = object()


@dataclass(frozen=True, init=False)
class Envelope:
    kind: Kind
    topology: str
    sender: str
    phase: str = "control"
    step: int = 0
    lane: int = 0
    micro_batch: int = 0
    edge: str = ""
    tensors: tuple[TensorDescriptor, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __init__(self, kind: Kind, topology: str, sender: str, phase: str = "control", step: int = 0,
                 lane: int = 0, micro_batch: int = 0, edge: str = "", tensors: tuple[TensorDescriptor, ...] = (),
                 meta: dict[str, Any] = _NO_META) -> None:
        # What the generated frozen __init__ does (one object.__setattr__ per field), in one dict update:
        # an envelope is built for every message.
        self.__dict__.update(kind=kind, topology=topology, sender=sender, phase=phase, step=step, lane=lane,
                             micro_batch=micro_batch, edge=edge, tensors=tensors,
                             meta={} if meta is _NO_META else meta)

    def to_bytes(self) -> bytes:
        """Compact JSON, byte for byte what `json.dumps(body, separators=(",", ":"))` gives; the parts that
        repeat from message to message (kind, topology, sender, phase, edge, descriptors) are cached."""
        numbers = (self.step, self.lane, self.micro_batch)
        if not (type(self.step) is int and type(self.lane) is int and type(self.micro_batch) is int
                and type(self.kind) is Kind and type(self.edge) is str):
            return self._to_bytes_slow()
        try:
            prefix = _PREFIXES[(self.kind, self.topology, self.sender, self.phase)]
            tensors = "[" + ",".join([_DESCRIPTORS[d] for d in self.tensors]) + "]"
            edge = _STRINGS[self.edge]
        except (KeyError, TypeError):
            return self._to_bytes_slow(cache=True)
        meta = _json(self.meta) if self.meta else "{}"
        return f'{prefix}"st":{numbers[0]},"l":{numbers[1]},"mb":{numbers[2]},"e":{edge},"x":{tensors},"m":{meta}}}'.encode()

    def _to_bytes_slow(self, cache: bool = False) -> bytes:
        body = {"v": VERSION, "k": self.kind.value, "t": self.topology, "s": self.sender, "p": self.phase,
                "st": self.step, "l": self.lane, "mb": self.micro_batch, "e": self.edge,
                "x": [d.to_json() for d in self.tensors], "m": self.meta}
        if cache:
            _remember(self)
        return _json(body).encode()

    @property
    def frame_count(self) -> int:
        return sum(len(d.parts) for d in self.tensors)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# Encoded fragments of headers, by the values they encode (bounded: cleared when full).
_PREFIXES: dict[tuple[Any, ...], str] = {}
_DESCRIPTORS: dict[TensorDescriptor, str] = {}
_STRINGS: dict[str, str] = {}
_CACHE_LIMIT = 1024


def _remember(envelope: Envelope) -> None:
    """Cache the fragments of a well-typed header (anything else keeps taking the plain json.dumps path)."""
    if not (type(envelope.kind) is Kind and type(envelope.topology) is str and type(envelope.sender) is str
            and type(envelope.phase) is str and type(envelope.edge) is str
            and all(type(d) is TensorDescriptor for d in envelope.tensors)):
        return
    for cache in (_PREFIXES, _DESCRIPTORS, _STRINGS):
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
    key = (envelope.kind, envelope.topology, envelope.sender, envelope.phase)
    if key not in _PREFIXES:
        _PREFIXES[key] = (f'{{"v":{VERSION},"k":{_json(envelope.kind.value)},"t":{_json(envelope.topology)},'
                          f'"s":{_json(envelope.sender)},"p":{_json(envelope.phase)},')
    for d in envelope.tensors:
        try:
            if d not in _DESCRIPTORS:
                _DESCRIPTORS[d] = _json(d.to_json())
        except TypeError:  # unhashable contents: not cached
            pass
    _STRINGS.setdefault(envelope.edge, _json(envelope.edge))


def _field(body: dict[str, Any], key: str, kind: type, reason: str = "bad_header") -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(reason, f"header field {key!r} must be {kind.__name__}")
    return value


# json.loads gives exact types (dict, list, str, int, float, bool, None), so the checks below compare
# types with `is`: a bool is not an int, a float is not an int.
_KINDS = {k.value: k for k in Kind}
_PHASES = frozenset(PHASES)
_DESCRIPTOR_CACHE: dict[tuple[Any, ...], TensorDescriptor] = {}  # validated descriptors, shared (they are immutable)
_SHAPE_LIMIT = 2**31
_COUNT_LIMIT = 2**40


def _descriptor(raw: Any) -> TensorDescriptor:
    if not (type(raw) is list and len(raw) == 4):
        raise ProtocolError("bad_header", "tensor descriptor must be [dtype, shape, codec, parts]")
    dtype, shape, codec, parts = raw
    if type(dtype) is not str or dtype not in DTYPES or type(codec) is not str or len(codec) > 16:
        raise ProtocolError("bad_dtype", f"unsupported dtype {str(dtype)[:16]!r}")
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise ProtocolError("bad_shape", "shape must be a list of at most 8 non-negative ints")
    for d in shape:
        if type(d) is not int or not 0 <= d < _SHAPE_LIMIT:
            raise ProtocolError("bad_shape", "shape must be a list of at most 8 non-negative ints")
    if not (type(parts) is list and 1 <= len(parts) <= 4):
        raise ProtocolError("bad_header", "a tensor has 1 to 4 parts")
    checked = []
    for part in parts:
        if not (type(part) is list and len(part) == 2):
            raise ProtocolError("bad_header", "a part is [dtype, element count]")
        part_dtype, count = part
        if type(part_dtype) is not str or part_dtype not in DTYPES or type(count) is not int \
                or not 0 <= count < _COUNT_LIMIT:
            raise ProtocolError("bad_header", "a part is [dtype, element count]")
        checked.append((part_dtype, count))
    key = (dtype, tuple(shape), codec, tuple(checked))
    descriptor = _DESCRIPTOR_CACHE.get(key)
    if descriptor is None:
        if len(_DESCRIPTOR_CACHE) >= _CACHE_LIMIT:
            _DESCRIPTOR_CACHE.clear()
        descriptor = _DESCRIPTOR_CACHE[key] = TensorDescriptor(*key)
    return descriptor


def _bad_type(key: str, kind: type) -> ProtocolError:
    return ProtocolError("bad_header", f"header field {key!r} must be {kind.__name__}")


_ENVELOPE_FIELDS = ("kind", "topology", "sender", "phase", "step", "lane", "micro_batch", "edge", "tensors", "meta")
assert tuple(f.name for f in fields(Envelope)) == _ENVELOPE_FIELDS  # parse_envelope sets every field


def parse_envelope(raw: bytes) -> Envelope:
    """The validated header. Headers in the exact compact form `Envelope.to_bytes` writes take a fast
    path that accepts only what the full parse accepts, with the same result; anything else (and any
    doubt) goes through the full parse, which gives the typed ProtocolError."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("oversized", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    envelope = _parse_canonical(raw)
    return envelope if envelope is not None else _parse_full(raw)


def _parse_full(raw: bytes) -> Envelope:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_header", "header is not JSON") from None
    if type(body) is not dict:
        raise ProtocolError("bad_header", "header must be a JSON object")
    get = body.get
    if get("v") != VERSION:
        raise ProtocolError("bad_version", f"protocol version {str(get('v'))[:8]!r}, expected {VERSION}")
    kind = get("k")
    kind = _KINDS.get(kind) if type(kind) is str else None
    if kind is None:
        raise ProtocolError("bad_kind", f"unknown message kind {str(get('k'))[:16]!r}")
    phase = get("p")
    if type(phase) is not str:
        raise _bad_type("p", str)
    if phase not in _PHASES:
        raise ProtocolError("bad_header", f"unknown phase {phase[:16]!r}")
    step, lane, micro_batch = get("st"), get("l"), get("mb")
    if type(step) is not int:
        raise _bad_type("st", int)
    if type(lane) is not int:
        raise _bad_type("l", int)
    if type(micro_batch) is not int:
        raise _bad_type("mb", int)
    if not (0 <= step < _COUNT_LIMIT and 0 <= lane < _COUNT_LIMIT and 0 <= micro_batch < _COUNT_LIMIT):
        raise ProtocolError("bad_header", "step, lane and micro-batch must be non-negative")
    tensors = get("x")
    if type(tensors) is not list:
        raise _bad_type("x", list)
    if len(tensors) > MAX_TENSORS:
        raise ProtocolError("oversized", f"{len(tensors)} tensors in one message")
    meta = get("m")
    if type(meta) is not dict:
        raise _bad_type("m", dict)
    topology, sender, edge = get("t"), get("s"), get("e")
    if type(topology) is not str:
        raise _bad_type("t", str)
    if type(sender) is not str:
        raise _bad_type("s", str)
    if type(edge) is not str:
        raise _bad_type("e", str)
    descriptors = tuple([_descriptor(t) for t in tensors])
    # Every field is checked above; fill the frozen dataclass directly (its __init__ would set each
    # field through object.__setattr__, a third of the parse time).
    envelope = _new_envelope(Envelope)
    envelope.__dict__.update(kind=kind, topology=topology, sender=sender, phase=phase, step=step, lane=lane,
                             micro_batch=micro_batch, edge=edge, tensors=descriptors, meta=meta)
    return envelope


_new_envelope = object.__new__

# The compact form to_bytes writes, field by field. Strings without escapes or control characters
# (JSON reads those bytes literally), integers without sign or leading zeros and at most 12 digits
# (so < 2**40), meta empty. `x` is everything up to the fixed tail; it must then be one JSON array.
_NAME = rb'"((?:[^"\\\x00-\x1f])*)"'
_INT = rb"(0|[1-9][0-9]{0,11})"
_CANONICAL = re.compile(
    rb'\{"v":' + str(VERSION).encode()
    + rb',"k":"(' + b"|".join(re.escape(k.value.encode()) for k in Kind) + rb')","t":' + _NAME + rb',"s":' + _NAME
    + rb',"p":"(' + b"|".join(re.escape(p.encode()) for p in PHASES) + rb')","st":' + _INT + rb',"l":' + _INT
    + rb',"mb":' + _INT + rb',"e":' + _NAME + rb',"x":(\[.*\]),"m":\{\}\}\Z', re.S)
_TENSOR_LISTS: dict[bytes, tuple[TensorDescriptor, ...]] = {}  # raw "x" value -> its validated descriptors
_TENSOR_LIST_CACHE_BYTES = 1024


def _parse_canonical(raw: bytes) -> Envelope | None:
    match = _CANONICAL.match(raw)
    if match is None:
        return None
    kind, topology, sender, phase, step, lane, micro_batch, edge, tensors = match.groups()
    descriptors = _TENSOR_LISTS.get(tensors)
    if descriptors is None:
        try:
            listed = json.loads(tensors)
            if type(listed) is not list or len(listed) > MAX_TENSORS:
                return None
            descriptors = tuple([_descriptor(t) for t in listed])
        except (ValueError, ProtocolError):
            return None  # the full parse reports it
        if len(tensors) <= _TENSOR_LIST_CACHE_BYTES:
            if len(_TENSOR_LISTS) >= _CACHE_LIMIT:
                _TENSOR_LISTS.clear()
            _TENSOR_LISTS[tensors] = descriptors
    try:
        topology, sender, edge = topology.decode(), sender.decode(), edge.decode()
    except UnicodeDecodeError:
        return None
    envelope = _new_envelope(Envelope)
    envelope.__dict__.update(kind=_KINDS[kind.decode()], topology=topology, sender=sender, phase=phase.decode(),
                             step=int(step), lane=int(lane), micro_batch=int(micro_batch), edge=edge,
                             tensors=descriptors, meta={})
    return envelope


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
