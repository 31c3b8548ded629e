"""Build a node's CURVE KeyRing from its topology (`security: {curve: true, keys_dir: ...}`).

The allow-list is exactly the topology's (expanded) nodes. A peer's public key comes from its
`public_key:` in the YAML when given, otherwise from `<keys_dir>/<peer>.key`; this node's own key
pair always comes from `<keys_dir>/<node>.key_secret`. A relative `keys_dir` starts at the folder of
the topology file the operator started with (`Topology.base_dir`). Nothing here comes from the
network.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from meshsl.errors import AuthError
from meshsl.security.keys import KeyRing, load_public_key, load_secret_file, public_key_path, secret_key_path, validate_z85_key

log = logging.getLogger("meshsl.security")


def keys_directory(topology) -> Path:
    keys_dir = topology.spec.security.keys_dir
    if not keys_dir:
        raise AuthError("security.curve is on but security.keys_dir is not set "
                        "(create keys with `meshsl keys generate DIR --topology TOPOLOGY`)")
    path = Path(keys_dir).expanduser()
    return path if path.is_absolute() else (Path(topology.base_dir) / path)


def keyring_for(topology, node: str) -> Optional[KeyRing]:
    """The KeyRing `node` authenticates with, or None when the topology runs in plain text.

    Raises AuthError naming the node and the file when a key is missing, malformed, or when this
    node's secret key does not belong to the public key the topology declares for it."""
    security = topology.spec.security
    if not security.curve:
        return None
    directory = keys_directory(topology)
    if not directory.is_dir():
        raise AuthError(f"node {node!r}: CURVE keys directory {directory} does not exist")
    try:
        public, secret = load_secret_file(secret_key_path(directory, node))
    except AuthError as exc:
        raise AuthError(f"node {node!r}: {exc}") from None
    peers: dict[str, bytes] = {}
    for name, spec in topology.nodes.items():
        if spec.public_key:
            peers[name] = validate_z85_key(spec.public_key, where=f"nodes.{name}.public_key")
        elif name != node or public_key_path(directory, name).is_file():
            try:
                peers[name] = load_public_key(directory, name)
            except AuthError as exc:
                raise AuthError(f"node {node!r} cannot authenticate peer {name!r}: {exc}") from None
    declared = peers.pop(node, None)
    if declared is not None and declared != public:
        # Fail fast and locally rather than being refused by every peer with no explanation.
        raise AuthError(f"node {node!r}: the secret key in {secret_key_path(directory, node)} does not match "
                        f"the public key the topology declares for {node!r}; this node would be refused")
    return KeyRing(own_node=node, public_key=public, secret_key=secret, peers=peers)


def transport_security(topology, node: str, on_refused: Optional[Callable[[str], None]] = None) -> dict:
    """Keyword options for `make_transport`: the socket limits, and the CURVE keyring when it is on."""
    retry = topology.spec.retry
    limits = {"max_message_bytes": topology.spec.security.max_message_bytes,
              # a connection silent past the round timeout plus the heartbeat timeout is dead: drop it
              "connection_timeout_s": retry.timeout_s + retry.heartbeat_timeout_s}
    keyring = keyring_for(topology, node)
    if keyring is None:
        return limits
    log.info("%s: CURVE on, %d peers on the allow-list", node, len(keyring.peers))
    return {"keyring": keyring, "on_auth_refused": on_refused, **limits}
