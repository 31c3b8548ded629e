"""Codecs for tensors on the wire, chosen per edge and direction.

A codec turns one logical tensor into a few raw parts (contiguous CPU tensors) and back. The layout
of those parts is a pure function of (shape, dtype) and the codec's settings, so a receiver can
check byte counts before it decodes anything; decode rejects every mismatch with
ProtocolError("bad_payload") instead of crashing or indexing out of bounds.

Dimension 0 is the sample dimension: int8 scales and top-k selection are per sample. Lossy codecs
only apply to floating tensors; integer and bool tensors (labels, ids) pass through exactly.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Mapping, Sequence
from typing import ClassVar

import torch
from pydantic import ValidationError
from torch import Tensor

from meshsl.config.specs import CompressionSpec  # re-exported: codecs are chosen by it
from meshsl.errors import ConfigError, ProtocolError

Layout = list[tuple[torch.dtype, int]]


def wire_bytes(parts: Sequence[Tensor]) -> int:
    """Bytes the raw parts occupy on the wire (headers not included)."""
    return sum(part.numel() * part.element_size() for part in parts)


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_payload", detail)


def _checked_shape(shape) -> tuple[int, ...]:
    """The logical shape comes from a peer's header, so it is validated like any wire data."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise _bad(f"shape must be a sequence of ints, got {type(shape).__name__}") from None
    checked = []
    for dim in dims:
        try:  # operator.index accepts ints and NumPy ints, refuses floats and strings
            size = operator.index(dim)
        except TypeError:
            size = -1
        if isinstance(dim, bool) or size < 0:
            raise _bad(f"shape must hold non-negative ints, got {dims!r}")
        checked.append(size)
    return tuple(checked)


def _checked_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise _bad(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype


def _samples(shape: tuple[int, ...]) -> tuple[int, int]:
    """(samples, elements per sample); a scalar counts as one sample of one element."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _as_cpu(t: Tensor) -> Tensor:
    """Detached, contiguous, on the CPU; no copy when it already is."""
    return t.detach().cpu().contiguous()


class Codec:
    """Base class: identity for non-floating tensors, validation of parts against the layout."""

    name: ClassVar[str]

    def part_layout(self, shape, dtype) -> Layout:
        """(dtype, element count) of every part emitted for a logical tensor of this shape/dtype."""
        dims, dtype = _checked_shape(shape), _checked_dtype(dtype)
        if not dtype.is_floating_point:
            return [(dtype, math.prod(dims))]
        return self._float_layout(dims, dtype)

    def encode(self, t: Tensor, slot: Hashable = None) -> list[Tensor]:
        """Parts for `t`; `slot` names sender-side state (top-k error feedback), None is a slot too."""
        if not isinstance(t, Tensor):
            raise ConfigError(f"{self.name} codec encodes tensors, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            return [_as_cpu(t).reshape(-1)]
        with torch.no_grad():
            return self._encode_float(t.detach(), slot)

    def decode(self, parts, shape, dtype) -> Tensor:
        """The logical tensor back from its parts; raises ProtocolError("bad_payload") on any mismatch."""
        dims, dtype = _checked_shape(shape), _checked_dtype(dtype)
        flat = self._checked_parts(parts, self.part_layout(dims, dtype))
        if not dtype.is_floating_point:
            return flat[0].clone().reshape(dims)
        with torch.no_grad():
            return self._decode_float(flat, dims, dtype)

    def reset(self, slot: Hashable = ...) -> None:
        """Forget sender-side state of one slot, or of every slot when none is named."""

    @staticmethod
    def _checked_parts(parts, layout: Layout) -> list[Tensor]:
        if not isinstance(parts, (list, tuple)):
            raise _bad(f"parts must be a list, got {type(parts).__name__}")
        if len(parts) != len(layout):
            raise _bad(f"expected {len(layout)} parts, got {len(parts)}")
        flat = []
        for index, (part, (dtype, numel)) in enumerate(zip(parts, layout)):
            if not isinstance(part, Tensor):
                raise _bad(f"part {index} is a {type(part).__name__}, not a tensor")
            if part.dtype != dtype:
                raise _bad(f"part {index} has dtype {part.dtype}, expected {dtype}")
            if part.numel() != numel:
                raise _bad(f"part {index} has {part.numel()} elements, expected {numel}")
            flat.append(part.reshape(-1))
        return flat

    # Subclasses implement the floating-point path.
    def _float_layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> Layout:
        raise NotImplementedError

    def _encode_float(self, t: Tensor, slot: Hashable) -> list[Tensor]:
        raise NotImplementedError

    def _decode_float(self, parts: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        raise NotImplementedError


class IdentityCodec(Codec):
    """Sends the tensor as it is."""

    name = "none"

    def _float_layout(self, shape, dtype):
        return [(dtype, math.prod(shape))]

    def _encode_float(self, t, slot):
        return [_as_cpu(t).reshape(-1)]

    def _decode_float(self, parts, shape, dtype):
        return parts[0].clone().reshape(shape)


class _CastCodec(Codec):
    """Sends the tensor cast to a narrower float type, saturating instead of overflowing to inf."""

    wire_dtype: ClassVar[torch.dtype]

    def _float_layout(self, shape, dtype):
        return [(self.wire_dtype, math.prod(shape))]

    def _encode_float(self, t, slot):
        limit = torch.finfo(self.wire_dtype).max
        if t.dtype == self.wire_dtype:  # already narrow: clamp out of place, never touch the caller's tensor
            return [_as_cpu(t.clamp(-limit, limit)).reshape(-1)]
        narrow = t.to(dtype=self.wire_dtype).cpu().contiguous()
        return [narrow.clamp_(-limit, limit).reshape(-1)]

    def _decode_float(self, parts, shape, dtype):
        return parts[0].to(dtype=dtype, copy=True).reshape(shape)


class Float16Codec(_CastCodec):
    name = "fp16"
    wire_dtype = torch.float16


class BFloat16Codec(_CastCodec):
    name = "bf16"
    wire_dtype = torch.bfloat16


class Int8Codec(Codec):
    """Per-sample symmetric quantisation: value ~= int8 * scale, scale = max|sample| / 127."""

    name = "int8"

    def _float_layout(self, shape, dtype):
        samples, per_sample = _samples(shape)
        return [(torch.int8, samples * per_sample), (torch.float32, samples)]

    def _encode_float(self, t, slot):
        samples, per_sample = _samples(tuple(t.shape))
        if samples * per_sample == 0:
            return [torch.empty(0, dtype=torch.int8), torch.zeros(samples, dtype=torch.float32)]
        rows = t.cpu().reshape(samples, per_sample).float()
        if not bool(torch.isfinite(rows).all()):
            raise ProtocolError("non_finite", "int8 codec cannot encode inf or nan values")
        scales = rows.abs().amax(dim=1) / 127.0
        # A zero scale (all-zero sample) quantises to zeros; the clamp only avoids 0/0.
        quantised = torch.round(rows / scales.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
        return [quantised.clamp_(-127, 127).to(torch.int8).reshape(-1), scales.contiguous()]

    def _decode_float(self, parts, shape, dtype):
        values, scales = parts
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise _bad("int8 scales must be finite and non-negative")
        samples, per_sample = _samples(shape)
        rows = values.reshape(samples, per_sample).float() * scales[:, None]
        return rows.to(dtype).reshape(shape)


class TopKCodec(Codec):
    """Per-sample top-k by magnitude, with error feedback: what was not sent is added next time."""

    name = "topk"

    def __init__(self, ratio: float = 0.1, error_feedback: bool = True) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"top-k ratio must be in (0, 1], got {ratio!r}")
        self.ratio = ratio
        self.error_feedback = error_feedback
        self._residuals: dict[Hashable, Tensor] = {}

    def kept_per_sample(self, per_sample: int) -> int:
        """k = max(1, ceil(ratio * elements)); rounded first so 0.1 * 30 keeps 3, not 4."""
        if per_sample == 0:
            return 0
        return min(per_sample, max(1, math.ceil(round(self.ratio * per_sample, 9))))

    def reset(self, slot: Hashable = ...) -> None:
        """Forget the residual of one slot, or of every slot when none is named."""
        if slot is ...:
            self._residuals.clear()
        else:
            self._residuals.pop(slot, None)

    def _float_layout(self, shape, dtype):
        samples, per_sample = _samples(shape)
        kept = samples * self.kept_per_sample(per_sample)
        return [(torch.int32, kept), (dtype, kept)]

    def _encode_float(self, t, slot):
        samples, per_sample = _samples(tuple(t.shape))
        k = self.kept_per_sample(per_sample)
        if samples * k == 0:
            return [torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=t.dtype)]
        # Accumulate in at least float32 so small residuals of half-precision inputs are not lost.
        work_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        accumulated = t.cpu().reshape(samples, per_sample).to(work_dtype)
        residual = self._residuals.get(slot) if self.error_feedback else None
        if residual is not None and residual.shape == accumulated.shape and residual.dtype == work_dtype:
            accumulated = accumulated + residual
        indices = accumulated.abs().topk(k, dim=1, sorted=False).indices
        chosen = accumulated.gather(1, indices)
        sent = chosen.to(t.dtype)
        if self.error_feedback:
            # Residual = accumulated - transmitted, including the rounding of the sent values.
            leftover = accumulated.scatter(1, indices, chosen - sent.to(work_dtype))
            self._residuals[slot] = leftover
        return [indices.to(torch.int32).reshape(-1), sent.reshape(-1).contiguous()]

    def _decode_float(self, parts, shape, dtype):
        indices, values = parts
        samples, per_sample = _samples(shape)
        k = self.kept_per_sample(per_sample)
        out = torch.zeros(samples, per_sample, dtype=dtype)
        if samples * k == 0:
            return out.reshape(shape)
        rows = indices.reshape(samples, k).long()
        if bool((rows < 0).any()) or bool((rows >= per_sample).any()):
            raise _bad(f"top-k index outside [0, {per_sample})")
        ordered = rows.sort(dim=1).values
        if k > 1 and bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise _bad("top-k indices repeat within a sample")
        out.scatter_(1, rows, values.reshape(samples, k))
        return out.reshape(shape)


CODECS: dict[str, type[Codec]] = {
    codec.name: codec for codec in (IdentityCodec, Float16Codec, BFloat16Codec, Int8Codec, TopKCodec)
}


def make_codec(spec: CompressionSpec | Mapping | None = None) -> Codec:
    """A fresh codec (with its own error-feedback state) for one edge direction."""
    if spec is None:
        spec = CompressionSpec()
    elif isinstance(spec, Mapping):
        try:
            spec = CompressionSpec.model_validate(dict(spec))
        except ValidationError as exc:
            raise ConfigError(f"invalid compression spec: {exc}") from None
    if spec.codec == "topk":
        return TopKCodec(ratio=spec.ratio, error_feedback=spec.error_feedback)
    return CODECS[spec.codec]()
