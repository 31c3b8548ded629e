"""Fault injection for chaos tests: drop chosen outgoing control messages of chosen nodes.

Off unless the environment sets MESHSL_FAULTS (never set it in production). The value is a
comma-separated list of `NODE:KIND[/OF]:COUNT` rules, e.g. `client:ack/restore:1` drops the first
acknowledgement of a RESTORE that node `client` sends: a lost message, as a flaky network loses one,
without timing tricks. Each process (a restarted node too) starts with the full counts."""
from __future__ import annotations

import os
import threading

_lock = threading.Lock()


def _parse(text: str) -> dict[tuple[str, str, str], int]:
    rules: dict[tuple[str, str, str], int] = {}
    for rule in filter(None, (r.strip() for r in text.split(","))):
        node, what, count = rule.split(":")
        kind, _, of = what.partition("/")
        rules[(node, kind, of)] = int(count)
    return rules


_rules = _parse(os.environ.get("MESHSL_FAULTS", ""))
ACTIVE = bool(_rules)


def drop(node: str, kind, meta) -> bool:
    """True when this message is to be lost (and counts it against its rule)."""
    of = meta.get("of", "") if isinstance(meta, dict) else ""
    key = (node, getattr(kind, "value", str(kind)), str(of))
    with _lock:
        left = _rules.get(key, 0)
        if left <= 0:
            return False
        _rules[key] = left - 1
    return True
