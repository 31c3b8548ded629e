"""Test helper: read one metric straight from a node's /metrics endpoint (no Prometheus server)."""
from __future__ import annotations

import re
import urllib.request


def metric_sum(port: int, name: str) -> float:
    """The sum of every sample of `name` on 127.0.0.1:`port`; -1.0 when the endpoint does not answer."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return -1.0
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
