"""Issue 26, "the first hour": each rough edge a new user hit, one test each (all but the CSV BOM row).
In-process where possible: pre-flight checks stop `meshsl run` before any process starts."""
from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
import yaml
from typer.testing import CliRunner

import meshsl
from meshsl.cli import app
from meshsl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
VANILLA = ROOT / "topologies" / "vanilla.yaml"
VERTICAL = ROOT / "topologies" / "vertical.yaml"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def no_cuda() -> bool:
    import torch
    return not torch.cuda.is_available()


# -- `device: cuda` with a CPU-only torch -----------------------------------------------------------
@pytest.mark.skipif(not no_cuda(), reason="this machine has CUDA")
def test_a_cuda_node_on_a_cpu_only_machine_fails_at_once_naming_the_node(tmp_path):
    """Exit 2 and the node named, before any node process starts (no node log in the run directory)."""
    document = yaml.safe_load(VERTICAL.read_text())
    document["nodes"][2]["device"] = "cuda"
    topology = tmp_path / "vertical-cuda.yaml"
    topology.write_text(yaml.safe_dump(document))
    shutil.copytree(ROOT / "topologies" / "data", tmp_path / "data", dirs_exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "meshsl", "run", str(topology), "--free-ports", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "nodes[2](lab).device: node 'lab' asks for device 'cuda'" in done.stderr
    assert "--device cpu" in done.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.log"))


def test_the_device_check_names_each_node_and_counts_devices():
    from meshsl.launch.preflight import check_devices
    topology = meshsl.load(VERTICAL, overrides={"nodes.hospital_a.device": "cuda:1", "nodes.lab.device": "cuda"})
    problems = check_devices(topology, topology.nodes, available=1)  # one GPU: cuda (0) exists, cuda:1 does not
    assert [p.where for p in problems] == [f"{VERTICAL}: nodes[0](hospital_a).device"]
    assert "1 CUDA device(s)" in str(problems[0])
    assert check_devices(topology, topology.nodes, available=2) == []


@pytest.mark.skipif(not no_cuda(), reason="this machine has CUDA")
def test_meshsl_node_with_a_missing_cuda_device_exits_2_and_simulate_too():
    result = cli("node", "lab", "-t", VERTICAL, "--set", "nodes.lab.device=cuda")
    assert result.exit_code == 2 and "node 'lab' asks for device 'cuda'" in result.output
    result = cli("simulate", VERTICAL, "--device", "cuda", "--steps", "1")
    assert result.exit_code == 2 and "asks for device 'cuda'" in result.output


def test_the_launcher_does_not_restart_what_would_fail_the_same_way(tmp_path):
    from meshsl.launch.launcher import _hopeless
    log = tmp_path / "lab.log"
    log.write_text("error: t.yaml: nodes[2](lab).device: no CUDA\n")
    why, _ = _hopeless(log, 2, None, None)  # exit 2: configuration / pre-flight
    assert "no CUDA" in why and "not restarted" in why
    log.write_text("Traceback ...\nRuntimeError: CUDA error: no kernel image\n")
    why, seen = _hopeless(log, 1, None, 12.0)  # the first crash: restart
    assert why == ""
    why, _ = _hopeless(log, 1, seen, 12.0)  # the same crash again, no step since: give up
    assert "failed twice the same way" in why and "no kernel image" in why
    assert _hopeless(log, 1, seen, 13.0)[0] == ""  # a step was committed in between: restart again
    assert _hopeless(log, -9, seen, 12.0)[0] == ""  # SIGKILL (a lost machine): restart


# -- a port already in use -----------------------------------------------------------------------------
def test_a_port_in_use_fails_at_once_with_the_free_ports_hint(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = cli("run", VANILLA, "--set", f"nodes.server.endpoint=tcp://127.0.0.1:{port}", "--run-dir",
                     tmp_path / "run", "--no-progress")
    assert result.exit_code == 2, result.output
    assert f"node 'server': port {port}" in result.output and "already in use" in result.output
    assert "--free-ports" in result.output
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


# -- unwritable checkpoint or output directories ---------------------------------------------------------
def test_an_unwritable_run_or_output_directory_fails_before_anything_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli("run", VANILLA, "--free-ports", "--run-dir", blocker / "run", "--no-progress")
    assert result.exit_code == 2 and f"--run-dir: cannot write {blocker / 'run'}: {blocker} is a file" in result.output
    result = cli("run", VANILLA, "--free-ports", "--run-dir", tmp_path / "ok", "--weights-out", blocker / "w")
    assert result.exit_code == 2 and "--weights-out: cannot write" in result.output
    with pytest.raises(meshsl.PreflightError, match="weights_out: cannot write"):
        meshsl.start(VANILLA, free_ports=True, run_dir=tmp_path / "api", weights_out=blocker / "w")


def test_meshsl_node_checks_its_checkpoint_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("node", "client", "-t", VANILLA, "--set", "checkpoint.every=5",
                 "--checkpoint-dir", blocker / "ckpt", "--bind", "tcp://127.0.0.1:0")
    assert result.exit_code == 2 and "--checkpoint-dir: cannot write" in result.output


# -- a node with no segments -----------------------------------------------------------------------------------
def test_a_node_with_no_segments_and_no_data_is_refused():
    document = yaml.safe_load(VANILLA.read_text())
    document["nodes"].append({"name": "idle", "endpoint": "tcp://127.0.0.1:5799", "party": "lab"})
    with pytest.raises(ConfigError, match=r"nodes\[2\]\(idle\): node 'idle' holds no segment and no data"):
        meshsl.load(document, base_dir=VANILLA.parent)
    document["training"]["coordinator"] = "idle"  # a node that only coordinates is fine
    assert meshsl.load(document, base_dir=VANILLA.parent).coordinator == "idle"


# -- `meshsl node` prints progress and a final line -----------------------------------------------------------
@pytest.mark.e2e
def test_meshsl_node_prints_progress_on_the_coordinator_and_a_final_line_everywhere(tmp_path):
    from meshsl.launch.launcher import with_free_ports
    document = with_free_ports(yaml.safe_load(VANILLA.read_text()))
    topology = tmp_path / "vanilla.yaml"
    topology.write_text(yaml.safe_dump(document))
    command = [sys.executable, "-m", "meshsl", "node", "-t", str(topology), "--base-dir", str(VANILLA.parent),
               "--steps", "4"]
    procs = {name: subprocess.Popen([*command[:4], name, *command[4:]], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in ("client", "server")}
    try:
        output = {name: proc.communicate(timeout=180) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs.values()), output
    server = output["server"][1]
    assert "node server: step 1/4: epoch 0 digit loss" in server and "samples/s" in server
    assert "node server: step 4/4: epoch 0 digit loss" in server and "; evaluated: digit loss" in server
    assert "node server: run finished: 4 steps, 1 epochs" in server and "digit loss" in server
    assert "node client: finished" in output["client"][1]
    assert "restored checkpoint" not in server + output["client"][1]


# -- the first log line of a fresh run -----------------------------------------------------------------------------
def test_a_fresh_run_logs_no_restore_warning(tmp_path, caplog):
    from meshsl.node.control import restore_log_level
    assert restore_log_level(0, fresh=True) == logging.DEBUG
    assert restore_log_level(0, fresh=False) == logging.WARNING and restore_log_level(5, fresh=True) == logging.WARNING
    with caplog.at_level(logging.WARNING):
        meshsl.simulate(VANILLA, steps=2, evaluate=False,
                        overrides={"checkpoint.every": 1, "checkpoint.directory": str(tmp_path / "ckpt")})
    assert list((tmp_path / "ckpt").iterdir())  # checkpoints were on, so the start restored step 0
    assert not [r for r in caplog.records if "restored checkpoint" in r.getMessage()]


# -- a normal shutdown --------------------------------------------------------------------------------------------
def test_a_peer_leaving_at_the_end_is_not_a_dropped_connection(caplog):
    from meshsl.node.inbox import NodeInbox
    rejected = []
    topology = SimpleNamespace(spec=SimpleNamespace(security=SimpleNamespace(max_message_bytes=2**28)))
    inbox = NodeInbox(topology, "server", {}, None, None, None, SimpleNamespace(reject=rejected.append), lambda: None)
    with caplog.at_level(logging.INFO, logger="meshsl.node"):
        inbox.connection_dropped(shutting_down=True)
    assert rejected == [] and not caplog.records
    with caplog.at_level(logging.INFO, logger="meshsl.node"):
        inbox.connection_dropped()
    assert rejected == ["connection_dropped"] and "frame above" in caplog.records[-1].getMessage()


# -- near-total leakage ----------------------------------------------------------------------------------------------
def test_near_total_leakage_is_flagged_with_what_to_do():
    from meshsl.privacy.leakage_warnings import audit_warnings, run_warnings
    found = run_warnings({"leakage": {"bottom->top": 0.99999, "ok->edge": 0.5}, "label_leakage": {"bottom->top": 0.97}})
    assert len(found) == 2 and "edge bottom->top: dCor 0.99999" in found[0] and "nopeek" in found[0]
    assert "label-attack AUC 0.970" in found[1] and "max_norm" in found[1]
    found = audit_warnings({"edges": {"bottom->top": {"dcor": 0.5, "inversion_relative_error": 0.037}}})
    assert found and "model-inversion error 0.037" in found[0]


def test_plan_warns_about_a_cut_right_after_one_linear_layer():
    result = cli("plan", VANILLA, "--set", "segments.bottom.layers=[[Linear, 64, 64]]")
    assert result.exit_code == 0, result.output
    assert "edge bottom->top: dCor" in result.output and "(untrained) >= 0.95" in result.output
    assert "edge bottom->top: dCor" not in cli("plan", VANILLA).output  # the shipped two-layer encoder


def test_run_prints_the_leakage_warnings_of_its_summary(capsys):
    from meshsl.cli.privacy import print_leakage_warnings
    print_leakage_warnings({"leakage": {"bottom->top": 0.99999}})
    assert "warning: edge bottom->top: dCor 0.99999" in capsys.readouterr().err


# -- an MSE task -----------------------------------------------------------------------------------------------------
def test_an_mse_task_shows_no_accuracy_and_its_contract_lists_none(tmp_path, capsys):
    import numpy as np
    from meshsl.cli.summary import print_summary
    from meshsl.privacy.contract import control_figures
    print_summary({"topology": "t", "steps": 1, "epochs": 1, "samples_per_s": 1.0, "wall_seconds": 1.0,
                   "tasks": {"price": {"train": {"loss": 0.5}, "eval": {"loss": 0.25, "samples": 3}}},
                   "edges": {}, "bytes_per_sample": {}})
    row = next(line for line in capsys.readouterr().out.splitlines() if "price" in line)
    assert "nan" not in row and "0.2500" in row
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((200, 64)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.random.default_rng(1).random(200).astype(np.float32))
    document = yaml.safe_load(VANILLA.read_text())
    for entry in document["data"]:
        entry["dataset"] = {"name": "numpy", "options": {"path": "x.npy", "labels": "y.npy"}}
    document["tasks"][0].update(loss="mse", name="price")
    document["segments"][1]["layers"][-1] = ["Linear", 64, 1]
    document["training"]["coordinator"] = "client"  # the server's loss figures cross to the clinic's party
    figures = [f["figure"] for f in control_figures(meshsl.load(document, base_dir=tmp_path))]
    assert "task price: eval loss" in figures
    assert not any("accuracy" in f or "confusion" in f or "correct" in f for f in figures)


# -- progress without a terminal; throughput of the last steps ---------------------------------------------------
def test_progress_without_a_terminal_is_whole_lines_never_cut_at_80_columns():
    from meshsl.cli.progress import LineProgress, progress_display
    from rich.console import Console
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False)
    display = progress_display(console, "training vertical-breast-cancer", 40, True)
    assert isinstance(display, LineProgress)
    with display:
        for step in range(40):
            display.row({"step": step, "epoch": 0, "samples_per_s": 812.4,
                         "tasks": {"a_rather_long_task_name": {"loss": 0.25, "accuracy": 0.9},
                                   "another_long_task_name": {"loss": 0.5, "accuracy": 0.8}}})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and all(len(line) > 80 for line in lines)
    assert lines[-1].endswith("another_long_task_name loss 0.500 acc 0.800 812 samples/s")


# -- monitoring for CSV topologies ------------------------------------------------------------------------------------
def test_monitoring_targets_of_a_run_directory_topology_with_csv_data(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(ROOT / "topologies" / "vertical_psi.yaml", run_dir / "topology.yaml")  # no data beside it
    result = cli("monitoring", "prometheus", run_dir / "topology.yaml", "-o", tmp_path / "targets.json")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "targets.json").read_text())) == 3


# -- Ctrl-C -----------------------------------------------------------------------------------------------------------
def test_ctrl_c_says_the_step_reached_and_how_to_resume(tmp_path, capsys):
    from meshsl.cli.run import _train_with_progress

    class Interrupted:
        run_dir, on_progress, stopped = tmp_path, None, False

        def start(self, topology, resolved):
            for step in range(3):
                self.on_progress({"step": step, "epoch": 0, "tasks": {}})

        def follow(self, topology, timeout):
            raise KeyboardInterrupt

        def stop(self):
            self.stopped = True

    launcher = Interrupted()
    topology = SimpleNamespace(spec=SimpleNamespace(checkpoint=SimpleNamespace(every=10)))
    with pytest.raises(typer.Exit) as exit_:
        _train_with_progress(launcher, topology, tmp_path / "topology.yaml", "training", 10, False, None,
                             resume_hint=f"meshsl run T.yaml --resume --run-dir {tmp_path}")
    assert exit_.value.exit_code == 130 and launcher.stopped
    err = capsys.readouterr().err
    assert "interrupted after step 3; every node was stopped" in err
    assert f"meshsl run T.yaml --resume --run-dir {tmp_path}" in err


# -- an aborted run: the coordinator's own exit and error --------------------------------------------------------------
class _Proc:
    """A node process that has exited (`code`) or exits with `code` once waited on for `needs` seconds."""

    def __init__(self, code: int, needs: float = 0.0) -> None:
        self.code, self.needs, self.returncode, self.terminated = code, needs, None if needs else code, False
        self.pid = 1

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None and timeout is not None and timeout < self.needs:
            raise subprocess.TimeoutExpired("meshsl node", timeout)
        if self.returncode is None:
            self.returncode = self.code
        return self.returncode

    def terminate(self):
        self.terminated, self.returncode = True, -15

    def kill(self):
        self.terminate()


def test_an_aborted_run_lets_the_coordinator_exit_3_with_its_error(tmp_path):
    """SplitFed below min_clients: the ward exits 3 first; the hub, still telling the lost clients, needs
    more than 5 s. It is not SIGTERMed: exit 3 and its own error name the cause."""
    from meshsl.launch.launcher import LocalRun
    run = LocalRun(VANILLA, tmp_path)
    run.processes = {"ward": _Proc(3), "hub": _Proc(3, needs=8.0)}
    (tmp_path / "summary.json").write_text(json.dumps({"error": "1 of 2 clients left, below clients.min_clients"}))
    error = run._aborted(SimpleNamespace(coordinator="hub"), "ward")
    assert not run.processes["hub"].terminated
    assert "below clients.min_clients" in str(error) and "hub=3" in str(error) and "ward=3" in str(error)


# -- the restart budget (documented: the behaviour is right) --------------------------------------------------------------
def test_the_docs_say_a_healed_link_still_spends_the_restart_budget():
    failover = (ROOT / "docs" / "failover.md").read_text()
    section = failover.split("### The restart budget counts failovers, not processes", 1)[1]
    assert "even when its process never stopped" in section and "`max_restarts: 0`" in section


# -- CLI: --version, --set, --device, did you mean ----------------------------------------------------------------------
def test_version():
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"meshsl {meshsl.__version__}"


def test_set_overrides_are_validated_and_change_the_hash():
    plain = json.loads(cli("plan", VERTICAL, "--json").output)
    result = cli("plan", VERTICAL, "--json", "--set", "training.optimizer.lr=0.01")
    assert result.exit_code == 0 and json.loads(result.output)["hash"] != plain["hash"]
    result = cli("validate", VERTICAL, "--set", "training.optimizer.lr=-1")
    assert result.exit_code == 2 and "training.optimizer.lr" in result.output and "greater than 0" in result.output
    result = cli("validate", VERTICAL, "--set", "training.optimzer.lr=0.01")
    assert result.exit_code == 2 and "training.optimzer: unknown key (did you mean 'optimizer'?)" in result.output
    result = cli("validate", VERTICAL, "--set", "nodes.nurse.device=cpu")
    assert result.exit_code == 2 and "no entry named 'nurse' (entries: hospital_a, hospital_b, lab" in result.output
    result = cli("validate", VERTICAL, "--set", "training.steps")
    assert result.exit_code == 2 and "is not KEY.PATH=VALUE" in result.output


def test_device_sets_every_node(tmp_path):
    result = cli("plan", VERTICAL, "--json", "--device", "cuda:1")
    assert result.exit_code == 0  # validation does not need the device: running does (pre-flight)
    assert meshsl.load(VERTICAL, device="cuda:1").nodes["lab"].device == "cuda:1"


def test_unknown_keys_in_the_yaml_get_a_did_you_mean(tmp_path):
    document = yaml.safe_load(VANILLA.read_text())
    document["training"]["epoch"] = 3
    document["nodes"][0]["metric_port"] = 9000
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(document))
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "training.epoch: unknown key (did you mean 'epochs'?)" in result.output
    assert "nodes[0](client).metric_port: unknown key (did you mean 'metrics_port'?)" in result.output


# -- docs --------------------------------------------------------------------------------------------------------------
def test_the_docs_match_the_code():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    readme = (ROOT / "README.md").read_text()
    assert requires == ">=3.11" and "Python ≥ 3.11" in readme and "3.10" not in readme
    monitoring = (ROOT / "monitoring" / "README.md").read_text()
    assert "does not run one yet" not in monitoring and "meshsl_edge_leakage_dcor" in monitoring
    assert "import meshsl" in readme and "docs/api.md" in readme and (ROOT / "docs" / "api.md").is_file()
