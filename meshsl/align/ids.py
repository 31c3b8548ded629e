"""Sample ids of a node's data sources: loading, checking, and the node's own id set.

A data source names its ids with `id_column` (a column of its csv file) or `id_file` (one id per
line, line i naming row i). Ids are compared as exact strings after stripping surrounding blanks.
Every error names the topology file, the data source, its node and party, and the file and column.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from meshsl.data import Selection, load_dataset
from meshsl.errors import ConfigError, DataError, TopologyError


def uses_ids(topology) -> bool:
    """True when the topology's rows are matched by sample id (PSI) instead of by row position."""
    return any(d.has_ids for d in topology.spec.data)


def data_nodes(topology) -> list[str]:
    """Nodes holding at least one data source, in topology order (the PSI participants)."""
    holders = {topology.placement[d.name][0] for d in topology.spec.data}
    return [n for n in topology.nodes if n in holders]


def leader_of(topology) -> str:
    """The node that runs the PSI with every other data node: alignment.leader or the first label holder."""
    alignment = topology.spec.alignment
    if alignment is not None and alignment.leader is not None:
        return alignment.leader
    return topology.node_of(topology.spec.tasks[0].labels)


def _where(topology, name: str) -> str:
    index = next(i for i, d in enumerate(topology.spec.data) if d.name == name)
    node = topology.placement[name][0]
    return f"{topology.source}: data[{index}]({name}) on node {node!r} of party {topology.nodes[node].party!r}"


def _id_origin(topology, spec) -> str:
    if spec.id_column is not None:
        path = spec.dataset.options.get("path", "?")
        return f"file {Path(topology.base_dir, str(path))}, column {spec.id_column!r}"
    return f"id file {Path(topology.base_dir, spec.id_file)}"


def check_declarations(topology) -> list[ConfigError]:
    """Static problems of the id declarations (no file is read)."""
    if not uses_ids(topology):
        return []
    problems: list[ConfigError] = []
    src = topology.source
    for i, d in enumerate(topology.spec.data):
        if not d.has_ids:
            problems.append(TopologyError(
                "declares no sample ids ('id_column' or 'id_file') while other data sources do; rows are matched "
                "by id, so every data source needs them", f"{src}: data[{i}]({d.name})"))
    if topology.spec.clients is not None:
        problems.append(TopologyError("sample-id alignment (PSI) is for vertical topologies; it cannot be "
                                      "combined with replicated clients", f"{src}: clients"))
    leader = leader_of(topology)
    if leader not in data_nodes(topology):
        problems.append(TopologyError(f"alignment leader {leader!r} holds no data source; pick a node that does "
                                      f"({', '.join(data_nodes(topology))})", f"{src}: alignment.leader"))
    return problems


def source_ids(topology, name: str) -> list[str]:
    """The sample id of every row of data source `name`, checked: one per row, none empty, no duplicates."""

    spec = topology.data[name]
    where = _where(topology, name)
    origin = _id_origin(topology, spec)
    try:
        table = load_dataset(spec.source_dataset, topology.base_dir, Selection(features=False))  # ids only
    except DataError as exc:
        raise DataError(f"{origin}: {exc.message}", where) from None
    if spec.id_column is not None:
        ids = list(table.ids or ())
    else:
        ids = _read_id_file(Path(topology.base_dir, spec.id_file), where)
    rows = len(table.features)
    if len(ids) != rows:
        raise DataError(f"{origin} names {len(ids)} ids for {rows} data rows; every row needs exactly one id", where)
    first_row: dict[str, int] = {}
    for row, value in enumerate(ids):
        if not value:
            raise DataError(f"{origin}: data row {row + 1} has an empty id", where)
        earlier = first_row.setdefault(value, row)
        if earlier != row:
            raise DataError(f"{origin}: duplicate id {value!r} in data rows {earlier + 1} and {row + 1}; "
                            f"sample ids must be unique within a party", where)
    return ids


def _read_id_file(path: Path, where: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read id file {path}: {exc}", where) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class NodeIds:
    """A node's id set (ids present in every one of its sources) and where each id sits in each source."""

    ids: list[str]
    rows: dict[str, dict[str, int]]  # source -> id -> row
    origin: str  # the files and columns, for error messages


def node_ids(topology, node: str) -> NodeIds:
    sources = [d.name for d in topology.spec.data if topology.placement[d.name][0] == node]
    rows = {name: {value: row for row, value in enumerate(source_ids(topology, name))} for name in sources}
    common = [value for value in rows[sources[0]] if all(value in rows[s] for s in sources[1:])] if sources else []
    origin = "; ".join(_id_origin(topology, topology.data[s]) for s in sources)
    return NodeIds(ids=common, rows=rows, origin=origin)


def check_ids(topology) -> list[ConfigError]:
    """Load every source's ids and report each problem (missing column, duplicates, count mismatch)."""
    problems = check_declarations(topology)
    if problems or not uses_ids(topology):
        return problems
    for d in topology.spec.data:
        try:
            source_ids(topology, d.name)
        except DataError as exc:
            problems.append(exc)
    return problems


# ---- a prediction input's ids ---------------------------------------------------------------------
def id_column_of(topology, node: str) -> Optional[str]:
    """The id column a node's prediction input must have (topologies matched by sample id), else None."""
    if not uses_ids(topology):
        return None
    names = [d.id_column for d in topology.spec.data if topology.placement[d.name][0] == node and d.id_column]
    return names[0] if names else "id"


def read_node_ids(topology, node: str, path: Path) -> Optional[list[str]]:
    """The sample ids of `node`'s prediction input (its id column), checked like training ids; None
    when the topology matches rows by position."""
    column = id_column_of(topology, node)
    if column is None:
        return None
    where = f"--input {node}={path} (party {topology.nodes[node].party!r})"
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist", where)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.reader(handle) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}", where) from None
    header = [h.strip() for h in rows[0]] if rows else []
    if column not in header:
        raise DataError(f"{path}: id column {column!r} is not in the header {header}; rows are matched by "
                        f"sample id, so every prediction input needs it", where)
    at = header.index(column)
    ids: list[str] = []
    first: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        value = row[at].strip() if at < len(row) else ""
        if not value:
            raise DataError(f"{path}:{line} has an empty id in column {column!r}", where)
        if value in first:
            raise DataError(f"{path}: duplicate id {value!r} in column {column!r} (lines {first[value]} and {line})",
                            where)
        first[value] = line
        ids.append(value)
    if not ids:
        raise DataError(f"{path} has no data rows", where)
    return ids


# ---- what the plan shows ---------------------------------------------------------------------------
PROTOCOL = "ECDH private set intersection (openmined-psi, P-256), over the nodes' own transport"


def alignment_step(topology) -> Optional[dict]:
    """What the plan shows: who runs the PSI with whom, on which ids, and what each party learns."""
    if not uses_ids(topology):
        return None
    leader = leader_of(topology)
    members = [n for n in data_nodes(topology) if n != leader]
    spec = topology.spec.alignment
    party = {n: s.party for n, s in topology.nodes.items()}
    learns = {}
    for node in topology.nodes:
        if node == leader:
            what = ("the common ids (its own rows in the intersection), each member's id count and its "
                    "overlap with each member")
        elif node in members:
            what = (f"the common ids (its own rows in the intersection), the leader's id count and its own "
                    f"overlap with the leader {leader!r}")
        else:
            what = "the number of common samples only"
        learns[node] = what
    return {
        "when": "before training and before prediction, before any data is read",
        "protocol": PROTOCOL,
        "leader": leader,
        "members": members,
        "observers": [n for n in topology.nodes if n not in data_nodes(topology)],
        "ids": {d.name: {"node": topology.placement[d.name][0], "party": party[topology.placement[d.name][0]],
                         "from": _id_origin(topology, d)} for d in topology.spec.data},
        "min_intersection": spec.min_intersection if spec else 1,
        "order": "common samples sorted by id (every party holding them knows them); train/test split and "
                 "batches are then drawn over that order with the training seed",
        "crosses": "blinded P-256 points and counts only; never an id or a hash of an id",
        "learns": learns,
    }
