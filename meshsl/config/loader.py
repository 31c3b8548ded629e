"""Read a topology YAML file into a TopologySpec; every problem becomes a ConfigError naming file and key path."""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from meshsl.config.keys import did_you_mean, known_keys
from meshsl.config.overrides import Overrides, apply_overrides
from meshsl.config.schema import TopologySpec
from meshsl.errors import ConfigError, ConfigErrors


def key_path(loc: tuple[Any, ...], document: Any = None) -> str:
    """('nodes', 1, 'endpoint') -> 'nodes[1](server).endpoint' (the name helps find the entry)."""
    text = ""
    cursor = document
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool) and not isinstance(cursor, dict):
            text += f"[{part}]"
            cursor = cursor[part] if isinstance(cursor, list) and 0 <= part < len(cursor) else None
            if isinstance(cursor, dict) and isinstance(cursor.get("name"), str):
                text += f"({cursor['name']})"
        else:  # a mapping key (YAML allows non-string keys such as 1, true or null; the schema does not)
            label = part if isinstance(part, str) else repr(part)
            text += f".{label}" if text else label
            try:
                cursor = cursor.get(part) if isinstance(cursor, dict) else None
            except TypeError:
                cursor = None
    return text or "(top level)"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key; SafeLoader reports it below
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first defined on line {first.line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str, source: str = "<topology>") -> Any:
    """Parse YAML safely (no Python objects, no duplicate keys); errors name `source:line:column`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: never builds Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", where) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", source) from None


_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def parse_spec(document: Any, source: str = "<topology>") -> TopologySpec:
    if not isinstance(document, dict):
        raise ConfigError("the topology must be a mapping with keys nodes, data, segments, tasks", source)
    return validate_document(TopologySpec, document, source)


Model = TypeVar("Model", bound=BaseModel)


def validate_document(model: type[Model], document: Any, source: str) -> Model:
    """`model` from a parsed YAML document; ConfigErrors naming `source` and each wrong key path."""
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union"))))
            message = err["msg"]
            for prefix in _PYDANTIC_PREFIXES:
                message = message.removeprefix(prefix)
            if err["type"] == "extra_forbidden":
                message = "unknown key" + did_you_mean(loc[-1], known_keys(model, loc[:-1])) if loc else "unknown key"
            elif err["type"] == "missing":
                message = "required key is missing"
            problems.append(ConfigError(message, f"{source}: {key_path(loc, document)}"))
        raise ConfigErrors(problems) from None


def load_document(path: str | Path, overrides: Overrides = None) -> Any:
    """The topology file as parsed YAML, with `--set` overrides applied (not validated yet)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file: {exc}", str(path)) from None
    return apply_overrides(load_yaml(text, str(path)), overrides)


def load_spec(path: str | Path, overrides: Overrides = None) -> TopologySpec:
    return parse_spec(load_document(path, overrides), str(path))
