"""Turn tensors into raw frames (zero-copy views) and back, checking every byte count first."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from meshsl.errors import ProtocolError
from meshsl.protocol.envelope import DTYPES, Envelope, TensorDescriptor, parse_envelope

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
    "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}

# Received frames are read-only buffers; tensors built on them are never written in place.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError("bad_dtype", f"cannot send tensors of dtype {dtype}") from None


def raw_view(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype in _NUMPY_VIEWABLE:  # numpy() shares the storage and keeps the tensor alive
        return t.numpy().data.cast("B")  # ndarray.data: the array's own memoryview
    return t.reshape(-1).view(torch.uint8).numpy().data


_NUMPY_VIEWABLE = frozenset(v for k, v in TORCH_DTYPES.items() if k != "bfloat16")


def tensor_from_frame(buffer, dtype: str, count: int) -> torch.Tensor:
    expected = DTYPES[dtype] * count
    if len(buffer) != expected:
        raise ProtocolError("bad_size", f"frame of {len(buffer)} bytes, descriptor says {expected}")
    if count == 0:
        return torch.empty(0, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[dtype])  # the size is checked above


def encode_message(envelope: Envelope, parts: Sequence[Sequence[torch.Tensor]] = ()) -> list:
    """Frames for `envelope` whose descriptors describe `parts` (one list of raw parts per tensor)."""
    frames: list = [envelope.to_bytes()]
    for tensor_parts in parts:
        frames.extend(raw_view(p) for p in tensor_parts)
    return frames


def describe(dtype: torch.dtype, shape: tuple[int, ...], codec: str, parts: Sequence[torch.Tensor]) -> TensorDescriptor:
    key = (dtype, tuple(shape), codec, tuple([(p.dtype, p.numel()) for p in parts]))
    try:
        return _DESCRIBED[key]
    except (KeyError, TypeError):
        pass
    descriptor = TensorDescriptor(dtype_name(dtype), tuple(int(d) for d in shape), codec,
                                  tuple((dtype_name(p.dtype), int(p.numel())) for p in parts))
    if type(codec) is str:
        if len(_DESCRIBED) >= 1024:
            _DESCRIBED.clear()
        _DESCRIBED[key] = descriptor
    return descriptor


def describe_all(tensors: Sequence[torch.Tensor]) -> list[TensorDescriptor]:
    """Descriptors of whole tensors sent uncompressed, one part each (weights, control payloads)."""
    return [describe(t.dtype, tuple(t.shape), "none", [t]) for t in tensors]


_DESCRIBED: dict[tuple, TensorDescriptor] = {}  # descriptors are immutable: one per distinct layout


def _flat(view: memoryview) -> memoryview:
    try:
        return view.cast("B")
    except TypeError:
        raise ProtocolError("bad_size", "a frame is not one contiguous buffer") from None


def decode_message(frames: Sequence, max_bytes: int) -> tuple[Envelope, list[list[torch.Tensor]]]:
    """Parse the header, check frame count and every size, and view frames as tensors (no copies)."""
    if not frames:
        raise ProtocolError("bad_header", "empty message")
    buffers = []  # flat byte views of received zmq.Frames, bytes or memoryviews of any format
    total = 0
    for frame in frames:
        view = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        if view.format != "B" or view.ndim != 1:
            view = _flat(view)
        total += view.nbytes
        buffers.append(view)
    if total > max_bytes:
        raise ProtocolError("oversized", f"message of {total} bytes exceeds the cap of {max_bytes}")
    envelope = parse_envelope(bytes(buffers[0]))
    described = 0
    for descriptor in envelope.tensors:
        described += len(descriptor.parts)
    if described != len(buffers) - 1:
        raise ProtocolError("bad_frame_count", f"{len(buffers) - 1} frames, header describes {described}")
    tensors, index = [], 1
    for descriptor in envelope.tensors:
        parts = []
        for dtype, count in descriptor.parts:
            parts.append(tensor_from_frame(buffers[index], dtype, count))
            index += 1
        tensors.append(parts)
    return envelope, tensors
