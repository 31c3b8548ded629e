"""The wire format: a typed JSON header frame followed by raw tensor frames. Nothing is ever pickled.

`frames` (tensor encoding) needs torch; the envelope and the typed control messages do not, so the I/O-free
state machines that use them import without torch (tests/e2e/test_machines_without_torch.py)."""
from typing import Any

from meshsl.protocol.envelope import Envelope, Kind, TensorDescriptor

__all__ = ["Envelope", "Kind", "TensorDescriptor", "decode_message", "encode_message"]


def __getattr__(name: str) -> Any:
    if name in ("decode_message", "encode_message"):
        from meshsl.protocol import frames  # torch: only for code that moves tensors
        return getattr(frames, name)
    raise AttributeError(f"module 'meshsl.protocol' has no attribute {name!r}")
