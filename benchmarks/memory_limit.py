"""Run one process under a memory limit (a cgroup of its own), to show a party training from a file
larger than the memory it may use. cgroup v1 (`/sys/fs/cgroup/memory`) and v2 are both handled; needs root.

Pages of the file that are already in the page cache were charged to whoever read them first, so
`drop_page_cache()` runs before a measurement: the limited process then pays for every page it touches.
"""
from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path
from typing import Optional

V1 = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def _v2_root() -> Optional[Path]:
    for root in V2_ROOTS:
        controllers = root / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            return root
    return None


def unavailable() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root (a memory cgroup)"
    if (V1 / "memory.limit_in_bytes").exists() or _v2_root() is not None:
        return None
    return "no memory cgroup controller (v1 or v2) is mounted"


class MemoryLimit:
    """A fresh cgroup with `limit_bytes`; `wrap(argv)` runs argv inside it; removed on exit."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self.name = f"meshsl-{uuid.uuid4().hex[:8]}"
        self.v1 = (V1 / "memory.limit_in_bytes").exists()
        self.path = (V1 if self.v1 else _v2_root()) / self.name

    def __enter__(self) -> "MemoryLimit":
        self.path.mkdir()
        if self.v1:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(self.limit))
        else:
            (self.path / "memory.max").write_text(str(self.limit))
            (self.path / "memory.swap.max").write_text("0")
        return self

    def wrap(self, argv: list[str]) -> list[str]:
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {shlex.quote(str(procs))} && exec "$@"', "meshsl-limited", *argv]

    def peak_bytes(self) -> int:
        name = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        path = self.path / name
        return int(path.read_text()) if path.exists() else -1

    def oom_killed(self) -> bool:
        if self.v1:
            return "oom_kill 0" not in (self.path / "memory.oom_control").read_text()
        events = (self.path / "memory.events").read_text()
        return any(line.startswith("oom_kill ") and line.split()[1] != "0" for line in events.splitlines())

    def __exit__(self, *exc) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")
