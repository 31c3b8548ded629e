"""Structured logging: one line per event, each naming the node (and the step, when known).

    configure_logging("INFO", node="bottom-0", json=True)
    log = node_logger("bottom-0").bind(step=12)
    log.info("step committed", extra={"loss": 0.31})

Text lines look like ``2024-05-01T12:00:00.123Z INFO meshsl.runtime node=bottom-0 step=12 step
committed loss=0.31``; JSON lines carry the same fields as keys. Plain ``logging.getLogger``
loggers work too: pass ``extra={"step": ...}``, and the node falls back to the one given to
``configure_logging`` (several logical nodes in one process use ``node_logger`` instead).
"""
from __future__ import annotations

import json as jsonlib
import logging
import sys
import time
from typing import Any, MutableMapping

# Attributes every LogRecord has; anything else on a record came from `extra` and is printed.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "node", "step"}
_HANDLER_MARK = "_meshsl_handler"


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class _DefaultNode(logging.Filter):
    """Gives records without a node the process's node name, and every record a step field."""

    def __init__(self, node: str | None) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "node", None) is None:
            record.node = self.node
        if not hasattr(record, "step"):
            record.step = None
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name]
        node, step = getattr(record, "node", None), getattr(record, "step", None)  # set by NodeFilter
        if node is not None:
            parts.append(f"node={node}")
        if step is not None:
            parts.append(f"step={step}")
        parts.append(record.getMessage())
        parts += [f"{k}={v}" for k, v in _extras(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            # Keep one event per line: the traceback goes on the same line, newlines escaped.
            line += " exc=" + self.formatException(record.exc_info).replace("\n", "\\n")
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname,
                                 "logger": record.name, "node": getattr(record, "node", None)}
        step = getattr(record, "step", None)  # set by NodeFilter
        if step is not None:
            event["step"] = step
        event["msg"] = record.getMessage()
        event.update(_extras(record))
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return jsonlib.dumps(event, default=str)


def configure_logging(level: str = "INFO", node: str | None = None, json: bool = False) -> None:
    """Send all logging to stderr, one structured line per event. Safe to call again."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(_DefaultNode(node))
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


class NodeLogger(logging.LoggerAdapter):
    """A logger whose records carry fixed fields (node, step, ...); `bind` adds more."""

    def __init__(self, logger: logging.Logger, fields: dict[str, Any]) -> None:
        super().__init__(logger, fields)

    def bind(self, **fields: Any) -> "NodeLogger":
        return NodeLogger(self.logger, {**(self.extra or {}), **fields})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        # The stdlib adapter replaces a call's `extra`; merge instead, the call's fields winning.
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def node_logger(node: str, name: str = "meshsl") -> NodeLogger:
    return NodeLogger(logging.getLogger(name), {"node": node})
