import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def topologies_dir() -> Path:
    return TOPOLOGIES


@pytest.fixture
def restore_logging():
    """The CLI's root callback installs a stderr handler; take it away again after the test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


# ---- test tiers -------------------------------------------------------------------------------
# unit: no processes, no sockets beyond a loopback pair; integration: in-process simulation or live
# transports inside the test process; e2e: node processes, network namespaces, a Prometheus server.
# `make test` runs all three, `make test-fast` the first two. A test may carry its tier explicitly
# (@pytest.mark.unit / integration / e2e); otherwise it is read off what its module uses, so a new
# test file lands in the right tier without a list to keep up to date.
TIERS = ("unit", "integration", "e2e")
_E2E_SIGNS = ("subprocess", "sys.executable", "LocalRun", "netns", "prometheus_server", "Popen")
_INTEGRATION_SIGNS = ("simulate", "NodeRuntime", "ZmqTransport", "InProcessTransport", "make_transport")
_module_tiers: dict = {}


def _tier_of_module(path: Path) -> str:
    tier = _module_tiers.get(path)
    if tier is None:
        source = path.read_text(encoding="utf-8", errors="replace")
        tier = "e2e" if any(s in source for s in _E2E_SIGNS) else \
            "integration" if any(s in source for s in _INTEGRATION_SIGNS) else "unit"
        _module_tiers[path] = tier
    return tier


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS):
            continue
        tier = "e2e" if item.get_closest_marker("slow") else _tier_of_module(Path(str(item.fspath)))
        item.add_marker(getattr(pytest.mark, tier))
