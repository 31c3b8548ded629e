"""Wire codecs: round-trip error bounds, byte counts, top-k error feedback, and that decode meets
malformed parts with ProtocolError only."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshsl.protocol.compression import (
    CODECS,
    CompressionSpec,
    Int8Codec,
    TopKCodec,
    make_codec,
    wire_bytes,
)
from meshsl.errors import ConfigError, ProtocolError

ALL_SPECS = [CompressionSpec(codec=name, ratio=0.25) for name in CODECS]


def _sample(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _layout_of(parts):
    return [(p.dtype, p.numel()) for p in parts]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.codec)
@pytest.mark.parametrize("shape", [(16, 3, 4), (5,), (), (0, 7), (3, 0), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_parts_match_declared_layout_and_round_trip_shape(spec, shape, dtype):
    codec = make_codec(spec)
    tensor = _sample(*shape, dtype=dtype) if shape else torch.tensor(1.5, dtype=dtype)
    parts = codec.encode(tensor)
    assert _layout_of(parts) == codec.part_layout(shape, dtype)
    assert all(p.is_contiguous() and p.device.type == "cpu" for p in parts)
    decoded = codec.decode(parts, shape, dtype)
    assert decoded.shape == tensor.shape and decoded.dtype == dtype


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.codec)
def test_integer_tensors_pass_through_exactly(spec):
    codec = make_codec(spec)
    labels = torch.tensor([[3, 1], [0, 9]])
    parts = codec.encode(labels)
    assert _layout_of(parts) == [(torch.int64, 4)]
    assert torch.equal(codec.decode(parts, (2, 2), torch.int64), labels)


def test_identity_is_exact_and_encode_never_mutates_input():
    x = _sample(8, 10)
    before = x.clone()
    for spec in ALL_SPECS:
        make_codec(spec).encode(x, slot="s")
    assert torch.equal(x, before)
    codec = make_codec(None)
    assert torch.equal(codec.decode(codec.encode(x), x.shape, x.dtype), x)


def test_fp16_and_bf16_relative_error():
    x = _sample(64, 128) * 10
    for name, bound in (("fp16", 1e-3), ("bf16", 8e-3)):
        codec = make_codec(CompressionSpec(codec=name))
        decoded = codec.decode(codec.encode(x), x.shape, x.dtype)
        assert float(((decoded - x).abs() / x.abs().clamp_min(1e-3)).max()) < bound
    # Values beyond fp16's range saturate rather than becoming inf.
    big = torch.tensor([[1e6, -1e6, 1.0]])
    codec = make_codec(CompressionSpec(codec="fp16"))
    assert torch.isfinite(codec.decode(codec.encode(big), big.shape, big.dtype)).all()


def test_int8_error_within_half_a_step_and_quarter_of_the_bytes():
    x = _sample(32, 256) * torch.linspace(0.01, 100, 32)[:, None]
    x[3] = 0.0  # an all-zero sample must survive its zero scale
    codec = make_codec(CompressionSpec(codec="int8"))
    parts = codec.encode(x)
    values, scales = parts
    assert values.dtype == torch.int8 and scales.shape == (32,)
    decoded = codec.decode(parts, x.shape, x.dtype)
    error = (decoded - x).abs()
    assert bool((error <= scales[:, None] / 2 * (1 + 1e-5) + 1e-7).all())
    assert torch.equal(decoded[3], x[3])
    assert wire_bytes(parts) == x.numel() + 4 * 32
    assert wire_bytes(parts) <= 0.26 * wire_bytes(make_codec(None).encode(x))


def test_int8_refuses_to_encode_non_finite_values():
    with pytest.raises(ProtocolError):
        Int8Codec().encode(torch.tensor([[1.0, float("nan")]]))


def test_topk_keeps_exact_largest_entries_per_sample():
    x = _sample(6, 40, seed=3)
    codec = TopKCodec(ratio=0.1, error_feedback=False)
    indices, values = codec.encode(x)
    assert indices.dtype == torch.int32 and values.numel() == 6 * 4
    decoded = codec.decode([indices, values], x.shape, x.dtype)
    kept = decoded != 0
    assert torch.equal(kept.sum(dim=1), torch.full((6,), 4))
    assert torch.equal(decoded[kept], x[kept])
    threshold = x.abs().topk(4, dim=1).values[:, -1:]
    assert torch.equal(kept, x.abs() >= threshold)


def test_topk_count_is_deterministic_from_shape_and_ratio():
    assert TopKCodec(ratio=0.1).kept_per_sample(30) == 3  # not 4 from 0.1 * 30 = 3.0000000000000004
    assert TopKCodec(ratio=0.01).kept_per_sample(5) == 1
    assert TopKCodec(ratio=1.0).kept_per_sample(7) == 7
    assert TopKCodec(ratio=0.1).part_layout((4, 2, 15), torch.float16) == [(torch.int32, 12), (torch.float16, 12)]


def test_topk_error_feedback_transmits_the_input_sum_over_time():
    x = _sample(4, 100, seed=5)
    codec = TopKCodec(ratio=0.05, error_feedback=True)
    total = torch.zeros_like(x)
    rounds = 400
    for _ in range(rounds):
        total += codec.decode(codec.encode(x, slot="edge"), x.shape, x.dtype)
    relative = float((total - rounds * x).norm() / (rounds * x).norm())
    assert relative < 0.05
    # Without error feedback the small entries are never sent.
    plain = TopKCodec(ratio=0.05, error_feedback=False)
    sent = plain.decode(plain.encode(x), x.shape, x.dtype) * rounds
    assert float((sent - rounds * x).norm() / (rounds * x).norm()) > 0.5


def test_topk_residuals_are_per_slot_and_reset_on_shape_change():
    codec = TopKCodec(ratio=0.1)
    x = _sample(2, 50)
    first = codec.encode(x, slot="a")
    assert all(torch.equal(p, q) for p, q in zip(codec.encode(x, slot="b"), first))  # fresh slot
    assert not torch.equal(codec.encode(x, slot="a")[0], first[0])  # residual changed the choice
    other = _sample(3, 50, seed=1)
    fresh = TopKCodec(ratio=0.1, error_feedback=False).encode(other)
    assert all(torch.equal(p, q) for p, q in zip(codec.encode(other, slot="a"), fresh))
    codec.reset()
    assert all(torch.equal(p, q) for p, q in zip(codec.encode(x, slot="a"), first))


def test_decode_is_side_effect_free():
    codec = TopKCodec(ratio=0.2)
    x = _sample(3, 20)
    parts = codec.encode(x, slot=None)
    copies = [p.clone() for p in parts]
    next_parts = TopKCodec(ratio=0.2)
    next_parts.encode(x, slot=None)
    codec.decode(parts, x.shape, x.dtype)
    assert all(torch.equal(p, c) for p, c in zip(parts, copies))
    assert all(torch.equal(p, q) for p, q in zip(codec.encode(x), next_parts.encode(x)))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.codec)
def test_decode_rejects_wrong_count_dtype_and_numel(spec):
    codec = make_codec(spec)
    x = _sample(4, 8)
    parts = codec.encode(x)
    cases = [
        parts[:-1],
        parts + [torch.zeros(1)],
        [p.to(torch.float64) if p.dtype != torch.float64 else p.float() for p in parts],
        [torch.cat([p, p[:1]]) for p in parts],
        [p[:-1] for p in parts],
        "not a list",
        [b"bytes"] * len(parts),
    ]
    for bad in cases:
        with pytest.raises(ProtocolError) as info:
            codec.decode(bad, x.shape, x.dtype)
        assert info.value.reason == "bad_payload"
    for bad_shape in [(-1, 8), (4.0, 8), "48", None]:
        with pytest.raises(ProtocolError):
            codec.decode(parts, bad_shape, x.dtype)
    with pytest.raises(ProtocolError):
        codec.decode(parts, x.shape, "float32")


def test_topk_and_int8_reject_out_of_range_content():
    codec = TopKCodec(ratio=0.25)
    x = _sample(2, 8)
    indices, values = codec.encode(x)
    for bad in (8, -1, 2**31 - 1):
        broken = indices.clone()
        broken[1] = bad
        with pytest.raises(ProtocolError, match="bad_payload"):
            codec.decode([broken, values], x.shape, x.dtype)
    duplicate = indices.clone()
    duplicate[1] = duplicate[0]
    with pytest.raises(ProtocolError):
        codec.decode([duplicate, values], x.shape, x.dtype)
    q, scales = Int8Codec().encode(x)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ProtocolError):
            Int8Codec().decode([q, torch.tensor([1.0, bad])], x.shape, x.dtype)


def test_spec_validation_and_registry():
    assert set(CODECS) == {"none", "fp16", "bf16", "int8", "topk"}
    assert CompressionSpec().codec == "none" and CompressionSpec().ratio == 0.1
    for bad in ({"codec": "zip"}, {"ratio": 0.0}, {"ratio": 1.5}, {"level": 3}):
        with pytest.raises(ValidationError):
            CompressionSpec(**bad)
        with pytest.raises(ConfigError):
            make_codec(bad)
    assert isinstance(make_codec({"codec": "topk", "ratio": 0.5}), TopKCodec)
    with pytest.raises(ConfigError):
        TopKCodec(ratio=0.0)


# --- garbage in, ProtocolError out -------------------------------------------------------------

_PART_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32,
                torch.int64, torch.uint8, torch.bool]


@st.composite
def _garbage_part(draw):
    dtype = draw(st.sampled_from(_PART_DTYPES))
    numel = draw(st.integers(0, 40))
    if dtype.is_floating_point:
        values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16), min_size=numel,
                               max_size=numel))
        return torch.tensor(values, dtype=torch.float32).to(dtype)
    if dtype == torch.bool:
        return torch.tensor(draw(st.lists(st.booleans(), min_size=numel, max_size=numel)), dtype=dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    values = draw(st.lists(st.integers(low, high) | st.integers(-2, 10), min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.int64).to(dtype)


@st.composite
def _matching_layout_garbage(draw, codec, shape, dtype):
    """Parts with exactly the declared layout but random content (indices, scales, values)."""
    parts = []
    for part_dtype, numel in codec.part_layout(shape, dtype):
        if part_dtype.is_floating_point:
            values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=16),
                                   min_size=numel, max_size=numel))
            parts.append(torch.tensor(values, dtype=torch.float32).to(part_dtype))
        else:
            info = torch.iinfo(part_dtype)
            values = draw(st.lists(st.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1))
                                   | st.integers(-1, 12), min_size=numel, max_size=numel))
            parts.append(torch.tensor(values, dtype=torch.int64).to(part_dtype))
    return parts


_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
_logical_dtypes = st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(ALL_SPECS), shape=_shapes, dtype=_logical_dtypes, data=st.data())
def test_decode_of_garbage_raises_only_protocol_error(spec, shape, dtype, data):
    codec = make_codec(spec)
    if data.draw(st.booleans()):
        parts = data.draw(st.lists(_garbage_part() | st.none() | st.integers(), max_size=4))
    else:
        parts = data.draw(_matching_layout_garbage(codec, shape, dtype))
    try:
        decoded = codec.decode(parts, shape, dtype)
    except ProtocolError as error:
        assert error.reason == "bad_payload"
    else:
        assert decoded.shape == shape and decoded.dtype == dtype
        assert math.prod(shape) == decoded.numel()
