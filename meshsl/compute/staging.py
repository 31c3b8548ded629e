"""Pinned host staging for device<->host tensor transfers (CUDA only; CPU tensors pass through untouched).

Outgoing: a CUDA tensor is copied into page-locked host memory with non_blocking=True, and the stream is
synchronised before the bytes go to the transport. Incoming: host tensors go to the device from
page-locked memory with non_blocking=True, so the copy overlaps with the compute queued after it.
Page-locked buffers come from torch's caching host allocator, so freed ones are reused, not re-pinned.
"""
from __future__ import annotations

import torch


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with the values of `tensor`; CPU tensors are returned as they are (no copy)."""
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()  # bytes must be complete before sending
    return host


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; host->CUDA copies go through pinned memory and do not block the host."""
    if tensor.device == device:
        return tensor
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
