"""Authentication and encryption of node-to-node traffic: CURVE keys, the ZAP allow-list."""
from meshsl.security.curve import (
    ZAP_DOMAIN,
    AllowListProvider,
    HandshakeMonitor,
    MeshAuthenticator,
    configure_client,
    configure_server,
    is_loopback,
    start_authenticator,
    warn_if_plaintext_exposed,
)
from meshsl.security.keys import (
    KeyRing,
    generate_keys,
    load_key_pair,
    load_public_key,
    load_secret_file,
)

__all__ = [
    "ZAP_DOMAIN",
    "AllowListProvider",
    "HandshakeMonitor",
    "KeyRing",
    "MeshAuthenticator",
    "configure_client",
    "configure_server",
    "generate_keys",
    "is_loopback",
    "load_key_pair",
    "load_public_key",
    "load_secret_file",
    "start_authenticator",
    "warn_if_plaintext_exposed",
]
