"""Property: any mutation of a valid example topology gives a clean ConfigError (with a `where`) or a valid
topology, never another exception. Mutations act on the parsed YAML document (delete, rename, retype, random
values, swapped node names, duplicated and dropped list items) and on the YAML text itself."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshsl.config.loader import load_yaml, parse_spec
from meshsl.errors import ConfigError
from meshsl.plans.explain import plan_document
from meshsl.topology.model import Topology, topology_from_spec

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"
# The LLM examples load a language model per valid mutation (where `meshsl llm prepare` has built it): their
# checks have their own tests (tests/integration/test_llm_configurations.py); the fuzz stays fast on every machine.
EXAMPLES = [p for p in sorted(TOPOLOGIES.glob("*.yaml")) if not p.name.startswith("llm_")]
DOCUMENTS = {p.name: yaml.safe_load(p.read_text()) for p in EXAMPLES}
TEXTS = {p.name: p.read_text() for p in EXAMPLES}

# Words that mean something in a topology, so that mutations often stay near-valid and reach deep checks.
WORDS = ["clinic", "server", "cloud", "lab", "pixels", "digit_labels", "bottom", "top", "encoder", "trunk", "head",
         "labels", "features", "concat", "sum", "mean", "Linear", "ReLU", "Flatten", "BatchNorm1d", "Conv2d",
         "digits", "breast_cancer", "synthetic", "csv", "numpy", "factory", "cross_entropy", "mse",
         "bce_with_logits", "gpipe", "1f1b", "adam", "sgd", "all", "0:10", "tcp://127.0.0.1:5701", "inproc://x",
         "torch.nn:Linear", "meshsl.data.derived:digits_parity", "splitfed", "sequential", "dirichlet"]
SMALL_INTS = st.integers(min_value=-3, max_value=130)  # big enough to break shapes, small enough to stay fast
SCALARS = st.one_of(st.none(), st.booleans(), SMALL_INTS, st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(WORDS), st.text(max_size=8))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(WORDS + ["name", "node", "kind"]), SCALARS, max_size=2),
                   st.lists(st.lists(st.one_of(st.sampled_from(["Linear", "ReLU", "Flatten"]), SMALL_INTS),
                                     min_size=1, max_size=3), max_size=3))
OPS = ["delete", "rename", "retype", "value", "word", "int", "swap_nodes", "duplicate", "drop"]


def locations(document, prefix=()):
    """Every (container, key) pair inside the document, depth first."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield prefix, key
            yield from locations(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield prefix, index
            yield from locations(value, prefix + (index,))


def resolve(document, path):
    for part in path:
        document = document[part]
    return document


def mutate(document, data) -> str:
    path, key = data.draw(st.sampled_from(list(locations(document))), label="location")
    parent = resolve(document, path)
    op = data.draw(st.sampled_from(OPS), label="op")
    if op == "delete":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        parent[data.draw(st.sampled_from(WORDS + [f"{key}_x", str(key).upper()]), label="new key")] = parent.pop(key)
    elif op == "retype":  # the same content as another type: "3" for 3, [x] for x, {"x": x} ...
        value = parent[key]
        parent[key] = data.draw(st.sampled_from([str(value), [value], {"value": value}, None]), label="retyped")
    elif op == "value":
        parent[key] = data.draw(VALUES, label="value")
    elif op == "word":
        parent[key] = data.draw(st.sampled_from(WORDS), label="word")
    elif op == "int":
        parent[key] = data.draw(SMALL_INTS, label="int")
    elif op == "swap_nodes":  # two entries' `node:` (or two nodes' names) exchanged
        section = data.draw(st.sampled_from(["nodes", "data", "segments"]), label="section")
        listed = document.get(section)  # an earlier mutation may have made it anything
        entries = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
        field = "name" if section == "nodes" else "node"
        if len(entries) >= 2:
            a, b = data.draw(st.lists(st.sampled_from(range(len(entries))), min_size=2, max_size=2), label="pair")
            entries[a][field], entries[b][field] = entries[b].get(field), entries[a].get(field)
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif op == "drop" and isinstance(parent, list):
        parent.pop(key)
    return f"{op} {'.'.join(map(str, path + (key,)))}"


def check(document, source: str) -> None:
    """The property: a ConfigError whose text names where the problem is, or a valid Topology and its plan."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about zero-sized layers; irrelevant here
            spec = parse_spec(document, source)
            topology = topology_from_spec(spec, source, TOPOLOGIES)
    except ConfigError as exc:
        event(f"rejected: {type(exc).__name__}")
        for problem in getattr(exc, "problems", None) or [exc]:
            assert isinstance(problem, ConfigError)
            assert problem.where.startswith(source), f"{problem!r} does not name {source}"
            assert problem.message and "Traceback" not in problem.message
        return
    event("valid")
    assert isinstance(topology, Topology)
    assert set(topology.segment_info) == set(topology.segments)
    plan = plan_document(topology)  # a valid topology always has a plan
    assert set(plan["nodes"]) == set(topology.nodes) and plan["configurations"]
    assert all(info["forward_flops_per_sample"] >= 0 for info in plan["segments"].values())


@settings(max_examples=150, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.sampled_from(sorted(DOCUMENTS)), data=st.data(), count=st.integers(min_value=1, max_value=3))
def test_mutated_documents_give_config_errors_or_valid_topologies(name, data, count):
    document = copy.deepcopy(DOCUMENTS[name])
    for _ in range(count):
        if not isinstance(document, (dict, list)) or not list(locations(document)):
            break
        mutate(document, data)
    check(document, name)


@settings(max_examples=60, deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(TEXTS)), data=st.data())
def test_mutated_yaml_text_gives_config_errors_or_valid_topologies(name, data):
    """Edits of the raw text (deleted, duplicated or replaced characters and lines) through the YAML parser."""
    text = TEXTS[name]
    lines = text.splitlines(keepends=True)
    op = data.draw(st.sampled_from(["delete_line", "duplicate_line", "replace_chars", "insert_text"]), label="op")
    at = data.draw(st.integers(min_value=0, max_value=len(lines) - 1), label="line")
    if op == "delete_line":
        lines.pop(at)
    elif op == "duplicate_line":
        lines.insert(at, lines[at])
    else:
        line = lines[at]
        column = data.draw(st.integers(min_value=0, max_value=len(line)), label="column")
        new = data.draw(st.text(alphabet=":-[]{},'\"#&*!|>% \t\nabc019", min_size=1, max_size=4), label="text")
        end = column + (len(new) if op == "replace_chars" else 0)
        lines[at] = line[:column] + new + line[end:]
    try:
        document = load_yaml("".join(lines), name)
    except ConfigError as exc:
        assert exc.where.startswith(name) and exc.message.startswith("invalid YAML")
        return
    check(document, name)
