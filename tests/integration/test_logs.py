"""Structured logs: one line per event naming node and step, text or JSON, level from the CLI."""
from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from meshsl.cli.logs import configure_logging, node_logger
from meshsl.coordinator.runtime import RunOptions
from meshsl.launch.simulate import simulate
from meshsl.topology import load_topology

REPO = Path(__file__).resolve().parents[2]
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<level>[A-Z]+) (?P<logger>\S+)"
                       r"(?: node=(?P<node>\S+))?(?: step=(?P<step>\d+))? (?P<rest>.*)$")


def lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_text_lines_carry_node_step_and_fields(capsys, restore_logging):
    configure_logging("INFO", node="server")
    log = logging.getLogger("meshsl.test")
    log.info("step committed", extra={"step": 12, "loss": 0.31})
    log.info("no step yet")
    node_logger("client-1").bind(step=4).warning("round %s done", "r9", extra={"phase": "train"})
    out = lines(capsys)
    assert len(out) == 3
    first, second, third = (TEXT_LINE.match(line) for line in out)
    assert first and (first["level"], first["logger"], first["node"], first["step"]) == \
        ("INFO", "meshsl.test", "server", "12")
    assert first["rest"] == "step committed loss=0.31"
    assert second and second["node"] == "server" and second["step"] is None
    assert third and (third["node"], third["step"], third["rest"]) == ("client-1", "4", "round r9 done phase=train")


def test_level_filters_and_exceptions_stay_on_one_line(capsys, restore_logging):
    configure_logging("warning", node="n")
    log = logging.getLogger("meshsl.test")
    log.info("hidden")
    log.debug("hidden too")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("compute failed", extra={"step": 3})
    out = lines(capsys)
    assert len(out) == 1, out
    assert out[0].split(" ")[1:5] == ["ERROR", "meshsl.test", "node=n", "step=3"]
    assert "exc=Traceback" in out[0] and "ValueError: bad\\nthing" in out[0]


def test_configure_again_replaces_the_handler(capsys, restore_logging):
    configure_logging("INFO", node="a")
    configure_logging("INFO", node="b")
    logging.getLogger("meshsl.test").info("once")
    out = lines(capsys)
    assert len(out) == 1 and " node=b " in out[0]


def test_json_lines(capsys, restore_logging):
    configure_logging("DEBUG", node="server", json=True)
    logging.getLogger("meshsl.test").debug("evaluated", extra={"step": 5, "accuracy": 0.9})
    node_logger("client").info("hello")
    events = [json.loads(line) for line in lines(capsys)]
    assert events[0] == {"ts": events[0]["ts"], "level": "DEBUG", "logger": "meshsl.test", "node": "server",
                         "step": 5, "msg": "evaluated", "accuracy": 0.9}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", events[0]["ts"])
    assert events[1]["node"] == "client" and "step" not in events[1]


def test_runtime_events_name_node_and_step(tmp_path, capsys, restore_logging):
    """Nodes sharing a process (in-process simulation) still log their own names on each event."""
    document = yaml.safe_load((REPO / "topologies" / "vanilla.yaml").read_text())
    for node in document["nodes"]:
        node.pop("metrics_port", None)  # no exporters on the declared ports from this process
    path = tmp_path / "vanilla.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    configure_logging("INFO")
    summary, _ = asyncio.run(simulate(load_topology(path), RunOptions(steps=3)))
    assert summary["steps"] == 3
    matches = [TEXT_LINE.match(line) for line in lines(capsys)]
    assert all(matches)
    done = {(m["node"], m["step"]) for m in matches if re.match(r"round done round=\d+ phase=train ", m["rest"])}
    assert done == {(node, str(step)) for node in ("client", "server") for step in range(3)}
    committed = [m for m in matches if m["logger"] == "meshsl.coordinator" and m["rest"].startswith("step committed")]
    assert [(m["node"], m["step"]) for m in committed] == [("server", "0"), ("server", "1"), ("server", "2")]
    assert all(re.search(r"digit_loss=\d", m["rest"]) for m in committed)


@pytest.mark.parametrize("args, message", [
    (["--log-level", "LOUD"], "error: --log-level 'LOUD': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    (["--log-format", "xml"], "error: --log-format 'xml': expected text or json"),
])
def test_bad_logging_options_are_reported_without_traceback(args, message, monkeypatch, restore_logging):
    from typer.testing import CliRunner

    from meshsl.cli import app
    monkeypatch.delenv("MESHSL_LOG_FORMAT", raising=False)  # the root callback exports it for node processes
    result = CliRunner().invoke(app, [*args, "validate", str(REPO / "topologies" / "vanilla.yaml")])
    assert result.exit_code == 2, result.output
    assert message in result.output + (result.stderr or "")
    assert result.exception is None or isinstance(result.exception, SystemExit)
