"""Encode and validate the tensors of activation/gradient messages against the plan's edges."""
from __future__ import annotations

import math

import torch

from meshsl.protocol.compression import make_codec
from meshsl.errors import ProtocolError
from meshsl.plans.nodeplan import EdgePlan
from meshsl.protocol.frames import DTYPE_NAMES, describe, tensor_from_frame


class EdgeCodecs:
    """Codec objects per (edge, direction); top-k error feedback keeps state per sender-side slot."""

    def __init__(self, edges: dict[str, EdgePlan], aligned: bool = False) -> None:
        self.edges = edges
        # Frames arrive at arbitrary offsets inside ZeroMQ messages; vectorised kernels round
        # differently on misaligned data, so deterministic runs copy those (a memcpy) to aligned memory.
        self.aligned = aligned
        self._codecs = {}
        for edge in edges.values():
            self._codecs[(edge.name, "act")] = make_codec(_forward_spec(edge.forward_codec))
            self._codecs[(edge.name, "grad")] = make_codec(edge.backward_codec)

    def codec(self, edge: str, direction: str):
        return self._codecs[(edge, direction)]

    def encode(self, edge: str, direction: str, tensor: torch.Tensor, slot) -> tuple:
        codec = self.codec(edge, direction)
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu", non_blocking=False)
        parts = [tensor.contiguous()] if codec.name == "none" else codec.encode(tensor, slot)
        return describe(tensor.dtype, tuple(tensor.shape), codec.name, parts), parts

    def decode(self, edge: EdgePlan, direction: str, descriptor, parts: list[torch.Tensor],
               max_rows: int) -> torch.Tensor:
        """Check the descriptor against the plan (dtype, per-sample shape, rows, codec), then decode."""
        codec = self.codec(edge.name, direction)
        shape = descriptor.shape
        if descriptor.dtype != "float32":
            raise ProtocolError("bad_dtype", f"{edge.name} carries float32, got {descriptor.dtype}")
        if descriptor.codec != codec.name:
            raise ProtocolError("bad_codec", f"{edge.name} uses codec {codec.name}, got {descriptor.codec[:16]}")
        if len(shape) != len(edge.shape) + 1 or not _fits(edge, tuple(shape[1:])) or not 1 <= shape[0] <= max_rows:
            raise ProtocolError("bad_shape", f"{edge.name} expects (1..{max_rows}, {edge.shape}), got {shape}")
        layout = codec.part_layout(shape, torch.float32)
        if [(DTYPE_NAMES[d], n) for d, n in layout] != list(map(tuple, descriptor.parts)):
            raise ProtocolError("bad_size", f"{edge.name}: parts {descriptor.parts} do not match the codec layout")
        if codec.name == "none":
            tensor = parts[0].reshape(shape)  # zero-copy view of the received frame
            return tensor.clone() if self.aligned and tensor.data_ptr() % 64 else tensor
        return codec.decode(parts, shape, torch.float32)


def _fits(edge: EdgePlan, sample: tuple[int, ...]) -> bool:
    """The plan's per-sample shape; an LLM cut also carries shorter sequences (generation: 1 token a round)."""
    if edge.tokens and sample and edge.shape:
        return 1 <= sample[0] <= edge.shape[0] and sample[1:] == edge.shape[1:]
    return sample == edge.shape


def _forward_spec(spec):
    """Top-k error feedback on activations adds what one micro-batch's samples did not send to the NEXT
    micro-batch's (other) samples: it corrupts the forward pass (digits, top-k 10%: 23% instead of 92%
    accuracy). Activations therefore go without it unless the topology asks for it explicitly."""
    if spec.codec == "topk" and "error_feedback" not in spec.model_fields_set:
        return spec.model_copy(update={"error_feedback": False})
    return spec


def max_rows(batch_size: int, micro_batches: int) -> int:
    return math.ceil(batch_size / micro_batches)


__all__ = ["EdgeCodecs", "max_rows", "tensor_from_frame"]
