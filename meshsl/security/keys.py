"""CURVE key files on disk and the in-memory key ring a node authenticates with.

Key files use zmq's certificate format (`<node>.key` public, `<node>.key_secret` secret), so
`zmq.auth.load_certificate` and other ZeroMQ tools read them unchanged.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from meshsl.errors import AuthError, ConfigError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_KEY_LENGTH = 40  # 32 raw bytes -> 40 z85 characters

# Node names become file names: keep them to characters that cannot escape the directory.
_SAFE_NODE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

_PUBLIC_BANNER = """#   ****  Generated on {now} by meshsl  ****
#   ZeroMQ CURVE Public Certificate for node {node}
#   Share this file with every node of the topology.

"""
_SECRET_BANNER = """#   ****  Generated on {now} by meshsl  ****
#   ZeroMQ CURVE **Secret** Certificate for node {node}
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""


def public_key_path(directory: Path | str, node: str) -> Path:
    return Path(directory) / f"{node}{PUBLIC_SUFFIX}"


def secret_key_path(directory: Path | str, node: str) -> Path:
    return Path(directory) / f"{node}{SECRET_SUFFIX}"


def _check_node_name(node: str) -> None:
    if not _SAFE_NODE_NAME.match(node):
        raise ConfigError(
            f"node name {node!r} cannot name a key file (use letters, digits, '_', '.', '-')"
        )


def validate_z85_key(key: str | bytes, where: str = "") -> bytes:
    """Return `key` as z85 bytes, or raise AuthError if it is not a 32-byte CURVE key."""
    raw = key.encode("ascii", "replace") if isinstance(key, str) else bytes(key)
    if len(raw) != Z85_KEY_LENGTH:
        raise AuthError(f"{where or 'key'}: CURVE key must be {Z85_KEY_LENGTH} z85 characters, got {len(raw)}")
    try:
        z85.decode(raw)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise AuthError(f"{where or 'key'}: not a valid z85 CURVE key ({exc})") from None
    return raw


def _write_certificate(path: Path, banner: str, public: bytes, secret: bytes | None) -> None:
    lines = [banner, "metadata\n", "curve\n", f'    public-key = "{public.decode("ascii")}"\n']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"\n')
    # Created with its final mode and O_EXCL, so a secret is never world-readable, even briefly.
    mode = 0o600 if secret is not None else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.chmod(path, mode)  # the umask may have cleared bits we asked for


def generate_keys(directory: Path, nodes: list[str], overwrite: bool = False) -> dict[str, str]:
    """Write one CURVE key pair per node into `directory`; return node -> public key (z85)."""
    directory = Path(directory)
    if not nodes:
        raise ConfigError("no nodes given to generate keys for")
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"duplicate node names in {nodes}")
    for node in nodes:
        _check_node_name(node)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory")

    # Check every file before writing any, so a refusal leaves the directory untouched.
    if not overwrite:
        for node in nodes:
            for path in (public_key_path(directory, node), secret_key_path(directory, node)):
                if path.exists():
                    raise ConfigError(f"{path} already exists (pass overwrite/--force to replace it)")

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    public_keys: dict[str, str] = {}
    for node in nodes:
        public, secret = zmq.curve_keypair()
        pub_path, sec_path = public_key_path(directory, node), secret_key_path(directory, node)
        for path in (pub_path, sec_path):
            path.unlink(missing_ok=True)
        _write_certificate(pub_path, _PUBLIC_BANNER.format(now=now, node=node), public, None)
        _write_certificate(sec_path, _SECRET_BANNER.format(now=now, node=node), public, secret)
        public_keys[node] = public.decode("ascii")
    return public_keys


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise AuthError(f"CURVE key file {path} is missing")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthError(f"CURVE key file {path} is unreadable or invalid: {exc}") from None
    validate_z85_key(public, where=f"{path} public-key")
    if secret is not None:
        validate_z85_key(secret, where=f"{path} secret-key")
    return public, secret


def load_public_key(directory: Path | str, node: str) -> bytes:
    """Public key (z85 bytes) of `node` from `<directory>/<node>.key`."""
    _check_node_name(node)
    public, _ = _load(public_key_path(directory, node))
    return public


def load_secret_file(path: Path | str) -> tuple[bytes, bytes]:
    """(public, secret) z85 bytes from one secret certificate file."""
    path = Path(path)
    public, secret = _load(path)
    if secret is None:
        raise AuthError(f"CURVE key file {path} holds no secret-key")
    return public, secret


def load_key_pair(directory: Path | str, node: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 bytes of `node` from `<directory>/<node>.key_secret`."""
    _check_node_name(node)
    return load_secret_file(secret_key_path(directory, node))


@dataclass(frozen=True)
class KeyRing:
    """This node's key pair plus the public keys of every node it accepts (the allow-list)."""

    own_node: str
    public_key: bytes  # z85
    secret_key: bytes = field(repr=False)  # z85; kept out of repr so logs never show it
    peers: dict[str, bytes] = field(default_factory=dict)  # node -> public key (z85)

    def __post_init__(self) -> None:
        validate_z85_key(self.public_key, where=f"public key of {self.own_node!r}")
        validate_z85_key(self.secret_key, where=f"secret key of {self.own_node!r}")
        seen: dict[bytes, str] = {self.public_key: self.own_node}
        for node, key in self.peers.items():
            validate_z85_key(key, where=f"public key of {node!r}")
            if node == self.own_node and key != self.public_key:
                raise AuthError(f"topology lists a public key for {node!r} that does not match its secret key")
            if key in seen and seen[key] != node:
                # One key for two nodes would make the sender's identity ambiguous.
                raise AuthError(f"nodes {seen[key]!r} and {node!r} share the same public key")
            seen[key] = node

    @property
    def allowed(self) -> dict[bytes, str]:
        """Public key (z85) -> node name, for every key this node accepts (peers and itself)."""
        mapping = {key: node for node, key in self.peers.items()}
        mapping[self.public_key] = self.own_node
        return mapping

    def node_for_key(self, key: str | bytes) -> str | None:
        """Name of the node holding this public key (z85), or None if it is not on the allow-list."""
        raw = key.encode("ascii", "replace") if isinstance(key, str) else bytes(key)
        return self.allowed.get(raw)

    def public_key_of(self, node: str) -> bytes:
        if node == self.own_node:
            return self.public_key
        try:
            return self.peers[node]
        except KeyError:
            raise AuthError(f"no CURVE public key known for node {node!r}") from None

    @classmethod
    def from_directory(cls, directory: Path | str, own_node: str, all_nodes: list[str]) -> "KeyRing":
        """Own key pair from `<own>.key_secret`, peers' public keys from `<peer>.key`."""
        public, secret = load_key_pair(directory, own_node)
        peers = {node: load_public_key(directory, node) for node in all_nodes if node != own_node}
        return cls(own_node=own_node, public_key=public, secret_key=secret, peers=peers)

    @classmethod
    def from_public_keys(
        cls, own_node: str, public_keys: dict[str, str | bytes], secret_key_file: Path | str
    ) -> "KeyRing":
        """Peers' keys as listed inline in the topology, own pair from a secret certificate file."""
        public, secret = load_secret_file(secret_key_file)
        peers: dict[str, bytes] = {}
        for node, key in public_keys.items():
            if key is None:
                raise AuthError(f"topology lists no public_key for node {node!r}")
            peers[node] = validate_z85_key(key, where=f"public key of {node!r}")
        listed_own = peers.pop(own_node, None)
        if listed_own is not None and listed_own != public:
            raise AuthError(
                f"the topology's public key for {own_node!r} does not match {secret_key_file}"
            )
        return cls(own_node=own_node, public_key=public, secret_key=secret, peers=peers)
