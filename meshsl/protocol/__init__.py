"""The wire format: a typed JSON header frame followed by raw tensor frames. Nothing is ever pickled."""
from meshsl.protocol.envelope import Envelope, Kind, TensorDescriptor
from meshsl.protocol.frames import decode_message, encode_message

__all__ = ["Envelope", "Kind", "TensorDescriptor", "decode_message", "encode_message"]
