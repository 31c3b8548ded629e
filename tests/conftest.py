import logging
import os
from pathlib import Path

import pytest

from support.paths import ROOT, TOPOLOGIES  # noqa: F401  (tests/ is on the path: [tool.pytest] pythonpath)
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


# ---- test tiers ----------------------------------------------------------------------------------
# The folder is the tier: tests/unit (pure code, no processes), tests/integration (in-process simulation or
# live transports inside the test process), tests/e2e (node processes, network namespaces, a Prometheus
# server). `make test` runs all three, `make test-fast` the first two. A test may still carry another tier
# explicitly (@pytest.mark.unit / integration / e2e), and a test marked slow is e2e wherever it lives.
TIERS = ("unit", "integration", "e2e")


def _tier_of_path(path: Path) -> str:
    folder = path.resolve().relative_to(Path(__file__).resolve().parent).parts[0]
    if folder not in TIERS:
        raise pytest.UsageError(f"{path}: a test lives in tests/unit, tests/integration or tests/e2e")
    return folder


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS):
            continue
        tier = "e2e" if item.get_closest_marker("slow") else _tier_of_path(Path(str(item.fspath)))
        item.add_marker(getattr(pytest.mark, tier))
