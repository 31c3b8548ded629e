"""The cryptography: openmined-psi's ECDH primitives (P-256, hash-to-curve), nothing hand-written.

Each party holds a fresh secret exponent k. `blind(ids)` maps every id x to H(x)^k (the library's
client request); `reblind(values)` raises values someone else blinded to the party's own exponent
(the library's server step). Exponentiation commutes, so H(x)^(ab) computed on either side is the same
point, byte for byte: a party that holds the doubly blinded values of both sides sees which of its
rows are common and nothing about the others' other ids (the decisional Diffie-Hellman assumption).

The library's one-way flow (server setup + client request/response) tells only the client the
intersection; used in both directions it would cost twice as much. Blinding each side once and
reblinding the other side's values once costs the same four exponentiations per id pair as the
library's flow, and both sides learn the intersection.
"""
from __future__ import annotations

from typing import Sequence

from meshsl.errors import ConfigError

POINT_BYTES = 33  # a compressed P-256 point


def _library():
    try:
        import private_set_intersection.python as psi  # optional extra 'psi'
    except ImportError:  # the optional 'psi' extra: only topologies with sample ids need it
        raise ConfigError("this topology matches rows by sample id (private set intersection), which needs the "
                          "'psi' extra: pip install 'meshsl[psi]' (openmined-psi)", "alignment") from None
    return psi


class Blinder:
    """One party's secret exponent for one alignment session (never leaves the process)."""

    def __init__(self) -> None:
        psi = _library()
        self._psi = psi
        self._client = psi.client.CreateWithNewKey(True)  # reveal_intersection: keep request order
        self._server = psi.server.CreateFromKey(self._client.GetPrivateKeyBytes(), True)

    def blind(self, ids: Sequence[str]) -> bytes:
        """H(x)^k of every id, in order, as the library's serialized request."""
        return self._client.CreateRequest(list(ids)).SerializeToString()

    def reblind(self, request: bytes) -> bytes:
        """Raise another party's blinded values (a serialized request) to k, in order: a serialized response."""
        message = self._psi.Request()
        message.ParseFromString(request)
        return self._server.ProcessRequest(message).SerializeToString()


def request_values(payload: bytes) -> list[bytes]:
    psi = _library()
    message = psi.Request()
    message.ParseFromString(payload)
    return list(message.encrypted_elements)


def response_values(payload: bytes) -> list[bytes]:
    psi = _library()
    message = psi.Response()
    message.ParseFromString(payload)
    return list(message.encrypted_elements)


def pack_values(values: Sequence[bytes]) -> bytes:
    """A list of blinded values in the library's own message format (a Response)."""
    psi = _library()
    message = psi.Response()
    message.encrypted_elements.extend(values)
    return message.SerializeToString()
