"""`--free-ports` hands every node its own port, even when the kernel offers the same one twice."""
from __future__ import annotations

import itertools

import pytest
import yaml

from support.paths import TOPOLOGIES
from meshsl.launch import launcher

pytestmark = pytest.mark.unit


def test_a_port_offered_twice_is_not_handed_out_twice(monkeypatch):
    real = launcher.free_port
    probe = real()  # free now; offered twice in a row, as the kernel may do
    offers = itertools.chain([probe, probe], (real() for _ in itertools.count()))
    monkeypatch.setattr(launcher, "free_port", lambda: next(offers))
    document = launcher.with_free_ports(yaml.safe_load((TOPOLOGIES / "vanilla.yaml").read_text()))
    ports = [int(n["endpoint"].rsplit(":", 1)[1]) for n in document["nodes"]] + \
        [n["metrics_port"] for n in document["nodes"] if n.get("metrics_port")]
    assert len(ports) == len(set(ports)) >= 2
