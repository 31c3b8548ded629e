"""Test helper: a real Prometheus scraping given targets, and a query helper for its HTTP API.

    from support.prometheus_server import running_prometheus, query, wait_for

    with running_prometheus(["127.0.0.1:9101"], tmp_path) as base_url:
        rows = wait_for(lambda: query(base_url, "meshsl_up"), timeout=20)

    # or with the file_sd JSON that `meshsl monitoring prometheus` writes:
    with running_prometheus([], tmp_path, file_sd=[targets_json]) as base_url: ...

Skips the calling test when no `prometheus` binary is installed (Debian: apt-get install
prometheus). Prometheus takes about 5 s to scrape a target the first time, so poll with a deadline.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import pytest

T = TypeVar("T")
READY_TIMEOUT_S = 30.0


def prometheus_binary() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    fallback = Path("/usr/bin/prometheus")
    return str(fallback) if fallback.exists() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(targets: list[str], file_sd: Sequence[Path] = ()) -> str:
    job: dict = {"job_name": "meshsl", "honor_labels": True}  # same as monitoring/prometheus.yml
    if targets:
        job["static_configs"] = [{"targets": list(targets)}]
    if file_sd:
        job["file_sd_configs"] = [{"files": [str(Path(f).resolve()) for f in file_sd], "refresh_interval": "1s"}]
    # JSON is valid YAML, and quoting it this way needs no YAML writer.
    return json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [job],
    }, indent=2)


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@contextlib.contextmanager
def running_prometheus(targets: list[str], tmp_path: Path, file_sd: Sequence[Path] = ()) -> Iterator[str]:
    """Run Prometheus scraping `targets` ("host:port") and the targets listed in the `file_sd`
    JSON files every second; yields its base URL."""
    binary = prometheus_binary()
    if binary is None:
        pytest.skip("prometheus binary not installed: apt-get install prometheus")
    workdir = Path(tmp_path) / "prometheus"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(_config(targets, file_sd))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_ready(base_url, process, log_path)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        try:
            _get(f"{base_url}/-/ready", timeout=1.0)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise TimeoutError(f"prometheus not ready after {READY_TIMEOUT_S:.0f}s:\n"
                       f"{log_path.read_text(errors='replace')[-2000:]}")


def query(base_url: str, promql: str) -> list:
    """Instant query; returns the API's `data.result` list (each item has `metric` and `value`)."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    body = json.loads(_get(url, timeout=5.0))
    if body.get("status") != "success":
        raise RuntimeError(f"query {promql!r} failed: {body}")
    return body["data"]["result"]


def wait_for(probe: Callable[[], T], timeout: float = 20.0, interval: float = 0.25) -> T:
    """Call `probe` until it returns something truthy; returns that, or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout:.0f}s (last: {result!r})")
        time.sleep(interval)
