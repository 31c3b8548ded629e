"""`--set key.path=value` (and the Python API's `overrides=`): change a topology document before it is
validated, so an override is checked like the YAML and changes the topology hash like an edit would.

A key path walks mappings by key and lists by index, by an entry's `name` (`nodes.server.device`) or by
`*` (every entry: `nodes.*.device`). A value is read as YAML: `0.01` is a number, `[a, b]` a list."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Union

import yaml

from meshsl.errors import ConfigError

Overrides = Union[Mapping[str, Any], Iterable[str], None]


def parse_assignment(text: str, where: str = "--set") -> tuple[str, Any]:
    """'training.optimizer.lr=0.01' -> ('training.optimizer.lr', 0.01)."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise ConfigError(f"{text!r} is not KEY.PATH=VALUE (e.g. training.optimizer.lr=0.01)", where)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{text!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)})", where) from None
    return path.strip(), value


def as_pairs(overrides: Overrides, where: str = "--set") -> list[tuple[str, Any]]:
    """Overrides given as a mapping ({"training.steps": 5}) or as KEY=VALUE strings, in order."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [parse_assignment(overrides, where)]
    return [parse_assignment(text, where) for text in overrides]


def apply_overrides(document: dict, overrides: Overrides, where: str = "--set") -> dict:
    """A copy of `document` with every override applied (the original is left alone)."""
    pairs = as_pairs(overrides, where)
    if not pairs:
        return document
    if not isinstance(document, dict):
        raise ConfigError("the topology must be a mapping before overrides apply", where)
    result = copy.deepcopy(document)
    for path, value in pairs:
        _assign(result, path.split("."), value, f"{where} {path}")
    return result


def _assign(cursor: Any, parts: list[str], value: Any, where: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(cursor, list):
        for item in _entries(cursor, head, where):
            _set_or_descend(cursor, item, rest, value, where)
    elif isinstance(cursor, dict):
        if rest and not isinstance(cursor.get(head), (dict, list)):
            cursor[head] = {}  # e.g. training.label_dp.epsilon where the topology has no label_dp yet
        _set_or_descend(cursor, head, rest, value, where)
    else:
        raise ConfigError(f"cannot descend into {type(cursor).__name__} at {head!r}", where)


def _set_or_descend(container: Any, key: Any, rest: list[str], value: Any, where: str) -> None:
    if rest:
        _assign(container[key], rest, value, where)
    else:
        container[key] = copy.deepcopy(value)


def _entries(items: list, head: str, where: str) -> list[int]:
    """The indices of a list that `head` names: '*', an index, or an entry's name."""
    if head == "*":
        return list(range(len(items)))
    if head.lstrip("-").isdigit():
        index = int(head)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"index {index} is out of range (the list has {len(items)} entries)", where)
        return [index % len(items)]
    named = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("name") == head]
    if not named:
        names = [str(item.get("name")) for item in items if isinstance(item, dict) and "name" in item]
        raise ConfigError(f"no entry named {head!r} (entries: {', '.join(names) or 'none'}; or an index, or *)", where)
    return named


def device_override(device: str) -> dict[str, str]:
    """`--device cuda:1`: every node's device."""
    return {"nodes.*.device": device}
