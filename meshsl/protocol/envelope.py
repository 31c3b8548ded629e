"""The message header: kind, topology hash, sender, step, micro-batch, edge and tensor descriptors.

Parsed by hand rather than with pydantic because it runs for every micro-batch; every field is
type- and range-checked, and anything else raises ProtocolError with a bounded `reason`.
"""
from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
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


PHASES = ("train", "eval", "predict", "control")


@dataclass(frozen=True)
class TensorDescriptor:
    dtype: str
    shape: tuple[int, ...]
    codec: str
    parts: tuple[tuple[str, int], ...]  # (dtype, element count) of each raw frame

    def to_json(self) -> list:
        return [self.dtype, list(self.shape), self.codec, [list(p) for p in self.parts]]


@dataclass(frozen=True)
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

    def to_bytes(self) -> bytes:
        body = {"v": VERSION, "k": self.kind.value, "t": self.topology, "s": self.sender, "p": self.phase,
                "st": self.step, "l": self.lane, "mb": self.micro_batch, "e": self.edge,
                "x": [d.to_json() for d in self.tensors], "m": self.meta}
        return json.dumps(body, separators=(",", ":")).encode()

    @property
    def frame_count(self) -> int:
        return sum(len(d.parts) for d in self.tensors)


def _field(body: dict, key: str, kind: type, reason: str = "bad_header") -> Any:
    value = body.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(reason, f"header field {key!r} must be {kind.__name__}")
    return value


def _descriptor(raw: Any) -> TensorDescriptor:
    if not (isinstance(raw, list) and len(raw) == 4):
        raise ProtocolError("bad_header", "tensor descriptor must be [dtype, shape, codec, parts]")
    dtype, shape, codec, parts = raw
    if dtype not in DTYPES or not isinstance(codec, str) or len(codec) > 16:
        raise ProtocolError("bad_dtype", f"unsupported dtype {str(dtype)[:16]!r}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise ProtocolError("bad_shape", "shape must be a list of at most 8 non-negative ints")
    if not (isinstance(parts, list) and 1 <= len(parts) <= 4):
        raise ProtocolError("bad_header", "a tensor has 1 to 4 parts")
    checked = []
    for part in parts:
        if not (isinstance(part, list) and len(part) == 2 and part[0] in DTYPES and isinstance(part[1], int)
                and not isinstance(part[1], bool) and 0 <= part[1] < 2**40):
            raise ProtocolError("bad_header", "a part is [dtype, element count]")
        checked.append((part[0], part[1]))
    return TensorDescriptor(dtype, tuple(shape), codec, tuple(checked))


def parse_envelope(raw: bytes) -> Envelope:
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("oversized", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_header", "header is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_header", "header must be a JSON object")
    if body.get("v") != VERSION:
        raise ProtocolError("bad_version", f"protocol version {str(body.get('v'))[:8]!r}, expected {VERSION}")
    try:
        kind = Kind(body.get("k"))
    except ValueError:
        raise ProtocolError("bad_kind", f"unknown message kind {str(body.get('k'))[:16]!r}") from None
    phase = _field(body, "p", str)
    if phase not in PHASES:
        raise ProtocolError("bad_header", f"unknown phase {phase[:16]!r}")
    numbers = {key: _field(body, key, int) for key in ("st", "l", "mb")}
    if any(not 0 <= v < 2**40 for v in numbers.values()):
        raise ProtocolError("bad_header", "step, lane and micro-batch must be non-negative")
    tensors = _field(body, "x", list)
    if len(tensors) > MAX_TENSORS:
        raise ProtocolError("oversized", f"{len(tensors)} tensors in one message")
    meta = _field(body, "m", dict)
    return Envelope(kind=kind, topology=_field(body, "t", str), sender=_field(body, "s", str), phase=phase,
                    step=numbers["st"], lane=numbers["l"], micro_batch=numbers["mb"], edge=_field(body, "e", str),
                    tensors=tuple(_descriptor(t) for t in tensors), meta=meta)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
