"""The header's fast paths agree with the plain ones: to_bytes with json.dumps, the canonical-form parse
with the full validated parse (same Envelope, or the same typed ProtocolError), on valid and mutated headers."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from meshsl.errors import ProtocolError
from meshsl.protocol.envelope import (PHASES, Envelope, Kind, TensorDescriptor, _parse_canonical, _parse_full,
                                      parse_envelope)

texts = st.text(max_size=12) | st.sampled_from(["", "a->b", "t" * 40, 'q"uote', "back\\slash", "\x00", "é\u2028"])
counts = st.integers(0, 2**41) | st.integers(0, 9)
descriptors = st.builds(
    TensorDescriptor, st.sampled_from(["float32", "bfloat16", "int64", "float64"]),
    st.lists(st.integers(-1, 2**31), max_size=3).map(tuple), st.sampled_from(["none", "topk", "x" * 20]),
    st.lists(st.tuples(st.sampled_from(["float32", "uint8"]), counts), min_size=0, max_size=5).map(tuple))
envelopes = st.builds(
    Envelope, st.sampled_from(list(Kind)), texts, texts, st.sampled_from(list(PHASES) + ["other"]), counts, counts,
    counts, texts, st.lists(descriptors, max_size=3).map(tuple),
    st.sampled_from([{}, {"a": 1}, {"nested": [1, "x"]}]))


def _reference_bytes(e: Envelope) -> bytes:
    body = {"v": 1, "k": e.kind.value, "t": e.topology, "s": e.sender, "p": e.phase, "st": e.step, "l": e.lane,
            "mb": e.micro_batch, "e": e.edge, "x": [d.to_json() for d in e.tensors], "m": e.meta}
    return json.dumps(body, separators=(",", ":")).encode()


def _outcome(parse, raw: bytes):
    try:
        return parse(raw)
    except ProtocolError as exc:
        return ("error", exc.reason)


def _agree(raw: bytes) -> None:
    full = _outcome(_parse_full, raw)
    fast = _parse_canonical(raw)
    if fast is not None:  # the fast path only ever accepts what the full parse accepts, identically
        assert fast == full
    assert _outcome(parse_envelope, raw) == full


@settings(max_examples=400, deadline=None)
@given(envelopes)
def test_to_bytes_is_the_plain_json_and_parses_the_same_both_ways(envelope) -> None:
    raw = envelope.to_bytes()
    assert raw == _reference_bytes(envelope)
    assert envelope.to_bytes() == raw  # again, from the caches
    _agree(raw)


@settings(max_examples=1500, deadline=None)
@given(envelopes, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("rid")),
                           min_size=1, max_size=4))
def test_mutated_headers_parse_the_same_both_ways(envelope, edits) -> None:
    raw = bytearray(envelope.to_bytes())
    for position, byte, op in edits:
        i = position % (len(raw) + 1)
        if op == "r" and i < len(raw):
            raw[i] = byte
        elif op == "i":
            raw.insert(i, byte)
        elif op == "d" and i < len(raw):
            del raw[i]
    _agree(bytes(raw))


def test_canonical_header_takes_the_fast_path() -> None:
    d = TensorDescriptor("float32", (4, 3), "none", (("float32", 12),))
    e = Envelope(kind=Kind.ACTIVATION, topology="abc", sender="n0", phase="train", step=7, lane=1, micro_batch=2,
                 edge="s0", tensors=(d,))
    parsed = _parse_canonical(e.to_bytes())
    assert parsed == e and parsed.meta == {} and parsed.meta is not _parse_canonical(e.to_bytes()).meta
    for raw in (b'{"v":1,"k":"act","t":"a","s":"b","p":"train","st":01,"l":0,"mb":0,"e":"","x":[],"m":{}}',
                b'{"v":1,"k":"act","t":"a","s":"b","p":"train","st":1,"l":0,"mb":0,"e":"","x":[]],"m":{}}',
                b'{"v":1,"k":"act","t":"\\u0061","s":"b","p":"train","st":1,"l":0,"mb":0,"e":"","x":[],"m":{}}',
                b'{"v":1,"k":"act","t":"a","s":"b","p":"train","st":1099511627776,"l":0,"mb":0,"e":"","x":[],"m":{}}'):
        assert _parse_canonical(raw) is None
        _agree(raw)
