"""Coverage-guided fuzzing of the wire parser (optional; not part of CI).

    pip install atheris
    python fuzz/atheris_header.py -atheris_runs=200000

Any exception other than ProtocolError from parse_envelope / decode_message is a bug.
"""
from __future__ import annotations

import sys

try:
    import atheris
except ImportError:  # atheris is optional
    print("atheris is not installed; `pip install atheris` to run this target", file=sys.stderr)
    sys.exit(0)

with atheris.instrument_imports():
    from meshsl.errors import ProtocolError
    from meshsl.protocol.envelope import parse_envelope
    from meshsl.protocol.frames import decode_message

MAX_BYTES = 1 << 20


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    header = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
    frames = [header] + [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    try:
        parse_envelope(header)
    except ProtocolError:
        pass
    try:
        decode_message(frames, MAX_BYTES)
    except ProtocolError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
