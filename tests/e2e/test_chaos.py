"""Chaos tests, second round (issue 15), with real node processes: every fault ends in the weights of
an uninterrupted run, or in a loud failure on every party (non-zero exit, the cause named, no final
weights). The long variants are marked `slow`."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from meshsl.config.loader import load_spec
from meshsl.errors import RunAborted
from meshsl.launch.entry import EXIT_ABORTED
from meshsl.launch.launcher import LocalRun
from meshsl.topology.model import topology_from_spec
from support.processes import assert_same_weights, chaos_topology, kill_at, saved_weights as weights, train


pytestmark = pytest.mark.timeout(900)  # real processes: start-up alone can take minutes on a busy machine


def _launch(path: Path, run_dir: Path, fault=None, env: dict | None = None) -> tuple[LocalRun, object]:
    run = LocalRun(path, run_dir, free_ports=True, weights_out=run_dir / "weights", evaluate=False)
    resolved = run.prepare()
    topology = topology_from_spec(load_spec(resolved), str(resolved), path.parent)
    if fault:
        run.on_progress = lambda row: fault(run, row)
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        run.start(topology, resolved)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return run, topology


def _log(run_dir: Path, node: str) -> str:
    return (run_dir / f"{node}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    path = chaos_topology(tmp, every=2)
    train(path, tmp / "run")
    return weights(tmp / "run")


def test_an_aborted_run_fails_on_every_node_without_weights(tmp_path):
    """No checkpoints; the client is paused past the heartbeat timeout, so the coordinator aborts. Once
    resumed, the client learns of the abort: it exits non-zero naming the cause and writes no weights."""
    path = chaos_topology(tmp_path, every=0)
    paused = threading.Event()

    def pause_client(run: LocalRun, row: dict) -> None:
        if row.get("step") == 3 and not paused.is_set():
            paused.set()
            os.kill(run.processes["client"].pid, signal.SIGSTOP)

    run, _ = _launch(path, tmp_path / "run", pause_client)
    try:
        server = run.processes["server"]
        assert server.wait(timeout=120) == EXIT_ABORTED
        os.kill(run.processes["client"].pid, signal.SIGCONT)
        assert run.processes["client"].wait(timeout=60) == EXIT_ABORTED
    finally:
        run.stop()
    client_log = _log(tmp_path / "run", "client")
    assert "run aborted by the coordinator (server)" in client_log and "client" in client_log
    assert "wrote no weights" in client_log
    assert "no heartbeat" in _log(tmp_path / "run", "server")
    assert not list((tmp_path / "run" / "weights").glob("*.safetensors"))


@pytest.mark.slow
def test_an_abort_ends_meshsl_run_with_the_cause(tmp_path):
    """The launcher (`meshsl run`) raises the coordinator's reason once every node stopped by itself."""
    path = chaos_topology(tmp_path, every=0)
    with pytest.raises(RunAborted, match="client") as raised:
        train(path, tmp_path / "run", kill_at("client", 3, signal.SIGSTOP))
    assert "no heartbeat" in str(raised.value) or "client" in str(raised.value)


def test_a_frozen_coordinator_ends_the_run_on_every_node(tmp_path):
    """The coordinator's process stops for good (SIGSTOP): each node gives up after the declared timeouts
    with an error naming it, and the launcher ends non-zero instead of hanging."""
    path = chaos_topology(tmp_path, every=2, heartbeat_timeout_s=2.0, coordinator_timeout_s=8.0)
    run, topology = _launch(path, tmp_path / "run", kill_at("server", 4, signal.SIGSTOP))
    started = time.monotonic()
    try:
        with pytest.raises(RunAborted, match="coordinator 'server' silent"):
            run.follow(topology, timeout=120)
    finally:
        run.stop()
    assert time.monotonic() - started < 60
    assert run.processes["client"].returncode == EXIT_ABORTED
    assert not list((tmp_path / "run" / "weights").glob("*.safetensors"))


@pytest.mark.slow
def test_a_briefly_paused_coordinator_declares_no_healthy_node_lost(tmp_path, reference):
    """The coordinator's process pauses for twice the heartbeat timeout, then resumes: the silence was
    its own, so no node is declared lost and the weights are those of an uninterrupted run."""
    path = chaos_topology(tmp_path, every=2, heartbeat_timeout_s=2.0)
    paused = threading.Event()

    def pause_server(run: LocalRun, row: dict) -> None:
        if row.get("step") == 4 and not paused.is_set():
            paused.set()
            pid = run.processes["server"].pid
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(4.0, os.kill, (pid, signal.SIGCONT)).start()  # the fault: a 4 s freeze

    summary, run = train(path, tmp_path / "run", pause_server)
    assert paused.is_set()
    assert summary["failovers"] == 0 and not run.restarts
    assert_same_weights(weights(tmp_path / "run"), reference)


def test_a_lost_restore_ack_is_retried(tmp_path, reference):
    """The client's acknowledgement of the run's first RESTORE is lost: the coordinator sends RESTORE
    again (the node acknowledges again without reloading) and the run ends as if nothing happened.
    The RESTORE is resent after a heartbeat timeout: one long enough that no load makes the healthy client
    look lost (no failover may be counted), short enough for a quick resend."""
    path = chaos_topology(tmp_path, every=2, heartbeat_timeout_s=10.0, startup_timeout_s=40)
    run, topology = _launch(path, tmp_path / "run", env={"MESHSL_FAULTS": "client:ack/restore:1"})
    try:
        summary = run.follow(topology, timeout=120)
    finally:
        run.stop()
    assert summary["failovers"] == 0
    assert_same_weights(weights(tmp_path / "run"), reference)


def test_a_restarted_node_aborts_the_round_at_once(tmp_path, reference):
    """SIGKILL of the client with long timeouts and no exit report from the launcher (as when nodes run on
    other machines): its restart announces a new incarnation, the round is aborted at once (not at the
    120 s round timeout or the 90 s heartbeat timeout), the error names only the client, and the summary
    records the failover with its cause, detection time and recovery time."""
    path = chaos_topology(tmp_path, every=2, heartbeat_timeout_s=90.0, timeout_s=120, startup_timeout_s=120)
    started = time.time()
    summary, run = train(path, tmp_path / "run", kill_at("client", 5), exit_reports=False)
    assert run.restarts == {"client": 1}
    assert summary["failovers"] == 1
    event = summary["failover_events"][0]
    assert event["nodes"] == ["client"] and event["cause"] == "restarted"
    assert started < event["detected"] < started + 600
    assert 0 < event["recovery_seconds"] < 90  # restored long before any timeout (90 s heartbeat, 120 s round)
    assert_same_weights(weights(tmp_path / "run"), reference)


def _fill(directory: Path) -> None:
    """Take every free byte of the file system holding `directory`."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12, 1):  # down to the last byte: a small checkpoint fits in nothing
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_reaches_the_coordinator_as_the_os_error(tmp_path, small_disk):
    """The checkpoint disk fills up mid-run: the failing write on the compute thread is reported as
    FAILED with the OS error, and every party stops at once with it (no wedge, no misleading timeout)."""
    path = chaos_topology(tmp_path, every=1, timeout_s=60)
    filled = threading.Event()

    def fill_disk(run: LocalRun, row: dict) -> None:
        if row.get("step") == 4 and not filled.is_set():
            filled.set()
            _fill(small_disk)

    started = time.monotonic()
    with pytest.raises(RunAborted, match="No space left on device"):
        train(path, tmp_path / "run", fill_disk)
    assert time.monotonic() - started < 60
    assert not list((tmp_path / "run" / "weights").glob("*.safetensors"))
