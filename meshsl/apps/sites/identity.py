"""An identity (a site, a submitter, a project's provisioner): an Ed25519 signing key and a CURVE key pair,
generated where the identity lives. Only `NAME.identity.json` (the public halves) ever leaves that machine."""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from meshsl.errors import AuthError, ConfigError, SignatureInvalid
from meshsl.security.keys import generate_keys, load_key_pair, validate_z85_key


@dataclass(frozen=True)
class PublicIdentity:
    name: str
    sign_public: str  # base64 of the raw 32-byte Ed25519 public key
    curve_public: str  # z85 CURVE public key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.sign_public)

    def as_data(self) -> dict[str, str]:
        return {"name": self.name, "sign_public": self.sign_public, "curve_public": self.curve_public}

    @staticmethod
    def from_data(data: Any, where: str) -> "PublicIdentity":
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in
                                                 ("name", "sign_public", "curve_public")):
            raise ConfigError("an identity needs string fields name, sign_public and curve_public", where)
        _public_key(data["sign_public"], where)
        validate_z85_key(data["curve_public"], where=f"{where}: curve_public")
        return PublicIdentity(data["name"], data["sign_public"], data["curve_public"])


@dataclass(frozen=True)
class Identity:
    """The secret halves, loaded on the identity's own machine."""
    public: PublicIdentity
    signing_key: Ed25519PrivateKey
    curve_secret: bytes
    directory: Path

    @property
    def name(self) -> str:
        return self.public.name

    def sign(self, document: dict) -> str:
        return base64.b64encode(self.signing_key.sign(canonical(document))).decode("ascii")


def canonical(document: dict) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, so every party computes the same."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def fingerprint(sign_public: str) -> str:
    digest = hashlib.sha256(base64.b64decode(sign_public)).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def _public_key(sign_public: str, where: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(sign_public, validate=True))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a base64 Ed25519 public key ({exc})", where) from None


def verify(document: dict, signature: Any, signer: PublicIdentity, what: str) -> None:
    """SignatureInvalid unless `signature` is `signer`'s signature of `document`."""
    if not isinstance(signature, str) or not signature:
        raise SignatureInvalid(f"{what} is not signed (no signature)")
    try:
        raw = base64.b64decode(signature, validate=True)
        _public_key(signer.sign_public, what).verify(raw, canonical(document))
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureInvalid(f"{what}: the signature does not verify with {signer.name}'s key "
                               f"({signer.fingerprint})") from None


def identity_file(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.identity.json"


def create_identity(directory: Path, name: str) -> PublicIdentity:
    """Generate `name`'s keys in `directory` (secrets mode 0600); refuse to overwrite an existing identity."""
    directory = Path(directory)
    sign_path = directory / f"{name}.sign_secret"
    if sign_path.exists() or identity_file(directory, name).exists():
        raise ConfigError(f"identity {name!r} already exists in {directory}")
    curve_public = generate_keys(directory, [name])[name]
    key = Ed25519PrivateKey.generate()
    fd = os.open(sign_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(key.private_bytes_raw()).decode("ascii") + "\n")
    public = PublicIdentity(name, base64.b64encode(key.public_key().public_bytes_raw()).decode("ascii"),
                            curve_public)
    identity_file(directory, name).write_text(json.dumps(public.as_data(), indent=2) + "\n")
    return public


def load_public(path: Path) -> PublicIdentity:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read identity file: {exc}", str(path)) from None
    return PublicIdentity.from_data(data, str(path))


def load_identity(directory: Path, name: str) -> Identity:
    directory = Path(directory)
    public = load_public(identity_file(directory, name))
    try:
        raw = base64.b64decode(Path(directory / f"{name}.sign_secret").read_text().strip(), validate=True)
        key = Ed25519PrivateKey.from_private_bytes(raw)
    except (OSError, ValueError) as exc:
        raise AuthError(f"{directory}/{name}.sign_secret is missing or invalid ({exc})") from None
    if base64.b64encode(key.public_key().public_bytes_raw()).decode("ascii") != public.sign_public:
        raise AuthError(f"{directory}/{name}.sign_secret does not match {identity_file(directory, name)}")
    curve_public, curve_secret = load_key_pair(directory, name)
    if curve_public.decode("ascii") != public.curve_public:
        raise AuthError(f"{directory}/{name}.key_secret does not match {identity_file(directory, name)}")
    return Identity(public, key, curve_secret, directory)
