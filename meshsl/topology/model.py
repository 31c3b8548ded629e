"""Topology: a TopologySpec expanded per client lane, as a networkx graph, checked and shape-inferred."""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence, TYPE_CHECKING

import networkx as nx

from meshsl.config.loader import ConfigErrors, load_spec
from meshsl.config.schema import DataSpec, NodeSpec, SegmentSpec, TaskSpec, TopologySpec
from meshsl.errors import ConfigError
from meshsl.topology.checks import check_batch_size, check_topology
from meshsl.topology.expand import expand_nodes
from meshsl.topology.llm_checks import resolve_model_dirs

if TYPE_CHECKING:  # torch: shape inference fills it, parsing does not need it
    from meshsl.topology.shapes import SegmentInfo


@dataclass(frozen=True, eq=False)  # eq=False: identity hash, so derived data can be memoised beside it (weakly)
class Topology:
    spec: TopologySpec
    source: str
    base_dir: Path
    lanes: int
    nodes: dict[str, NodeSpec]
    placement: dict[str, tuple[str, ...]]  # data/segment name -> concrete node per lane
    graph: nx.DiGraph
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # data/segment output per sample
    segment_info: dict[str, SegmentInfo] = field(default_factory=dict)
    num_classes: dict[str, int | None] = field(default_factory=dict)  # labels data -> classes
    warnings: list[str] = field(default_factory=list)

    @cached_property
    def hash(self) -> str:
        """Identifies this exact topology on the wire: peers running another version are refused."""
        return hashlib.sha256(self.spec.model_dump_json().encode()).hexdigest()[:16]

    @cached_property
    def segments(self) -> dict[str, SegmentSpec]:
        return {s.name: s for s in self.spec.segments}

    @cached_property
    def data(self) -> dict[str, DataSpec]:
        return {d.name: d for d in self.spec.data}

    @cached_property
    def tasks(self) -> dict[str, TaskSpec]:
        return {t.name: t for t in self.spec.tasks}

    @cached_property
    def segment_order(self) -> list[str]:
        return [n for n in nx.topological_sort(self.graph) if self.graph.nodes[n]["kind"] == "segment"]

    def consumers(self, name: str) -> list[str]:
        """Segments that take `name` (a data source or segment) as input, in declaration order."""
        return [s.name for s in self.spec.segments if name in s.inputs]

    def tasks_of(self, segment: str) -> list[TaskSpec]:
        return [t for t in self.spec.tasks if t.output == segment]

    def party_of(self, name: str, lane: int = 0) -> str:
        return self.nodes[self.placement[name][lane]].party

    def node_of(self, name: str, lane: int = 0) -> str:
        return self.placement[name][lane]

    def lanes_of(self, name: str, node: str) -> list[int]:
        return list(self._lanes_by_node(name).get(node, ()))

    def is_replicated(self, name: str) -> bool:
        return len(self._lanes_by_node(name)) > 1

    def _lanes_by_node(self, name: str) -> dict[str, list[int]]:
        """node -> its lanes of `name`, built once per name (every node of a 1,000-client topology asks)."""
        index = _LANES_INDEX.get(self)
        if index is None:
            index = _LANES_INDEX[self] = {}
        placement = self.placement[name]
        cached = index.get(name)
        if cached is None or cached[0] is not placement:
            by_node: dict[str, list[int]] = {}
            for lane, node in enumerate(placement):
                by_node.setdefault(node, []).append(lane)
            cached = index[name] = (placement, by_node)
        return cached[1]

    @cached_property
    def coordinator(self) -> str:
        if self.spec.training.coordinator:
            return self.spec.training.coordinator
        return self.node_of(self.spec.tasks[0].labels)

    def cut_edges(self) -> list[tuple[str, str]]:
        """(producer segment, consumer segment) pairs whose ends sit on different parties in some lane."""
        cached = _CUT_EDGES.get(self)
        if cached is None:
            cached = _CUT_EDGES[self] = tuple(self._find_cut_edges())
        return list(cached)

    def _find_cut_edges(self) -> list[tuple[str, str]]:
        edges = []
        for seg in self.spec.segments:
            for src in seg.inputs:
                if src in self.segments and any(
                    self.party_of(src, lane) != self.party_of(seg.name, lane) for lane in range(self.lanes)
                ):
                    edges.append((src, seg.name))
        return edges

    def recognised_configurations(self) -> list[str]:
        kinds = []
        label_parties = {self.party_of(t.labels) for t in self.spec.tasks}
        feature_parties = {self.party_of(d.name) for d in self.spec.data if d.kind == "features"}
        crossed = bool(self.cut_edges())
        if self.spec.clients:
            kinds.append(f"multi-client ({self.spec.clients.mode}, {self.lanes} clients)")
        if len(feature_parties) > 1:
            kinds.append("vertical")
        u_tasks = self.u_shaped_tasks()
        if label_parties <= feature_parties and crossed:
            kinds.append("u-shaped")
        elif crossed:
            kinds.append("vanilla")
            if u_tasks:  # mixed: some heads come back to a feature party, other labels sit elsewhere
                kinds.append(f"u-shaped part (task{'s' if len(u_tasks) > 1 else ''} {', '.join(u_tasks)})")
        if len(self.spec.tasks) > 1:
            kinds.append("multi-task")
        parties = {n.party for n in self.nodes.values()}
        hops = self._longest_party_chain()
        if hops >= 3:
            kinds.append(f"multi-hop ({hops} hops)")
        if len(parties) == 1:
            kinds.append("single-party")
        return kinds

    def u_shaped_tasks(self) -> list[str]:
        """Tasks whose labels sit with a party that also feeds raw features into them, through another party."""
        found = []
        for task in self.spec.tasks:
            party = self.party_of(task.labels)
            upstream = nx.ancestors(self.graph, task.output)
            own_features = any(n in self.data and self.data[n].kind == "features" and self.party_of(n) == party
                               for n in upstream)
            away = any(n in self.segments and self.party_of(n) != party for n in upstream)
            if own_features and away:
                found.append(task.name)
        return found

    def _longest_party_chain(self) -> int:
        longest: dict[str, int] = {}
        for name in nx.topological_sort(self.graph):
            preds = [p for p in self.graph.predecessors(name) if p in self.segments]
            longest[name] = max(
                (longest[p] + (self.party_of(p) != self.party_of(name)) for p in preds), default=0
            ) if name in self.segments else 0
        return max(longest.values(), default=0)


# Derived data memoised beside a (frozen) topology rather than stashed on it; gone with the topology.
_LANES_INDEX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # name -> (placement, node -> lanes)
_CUT_EDGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_KIND_WORDS = {"data": "data source", "segment": "segment", "task": "task"}


def build_graph(spec: TopologySpec, source: str) -> nx.DiGraph:
    graph = nx.DiGraph()
    problems: list[ConfigError] = []
    seen: dict[str, str] = {}
    groups: tuple[tuple[str, Sequence[Any]], ...] = (("data", spec.data), ("segment", spec.segments),
                                                     ("task", spec.tasks))
    for kind, items in groups:
        for i, item in enumerate(items):
            where = f"{source}: {'data' if kind == 'data' else kind + 's'}[{i}]({item.name}).name"
            if item.name in seen:
                problems.append(ConfigError(f"name {item.name!r} is already used by a {_KIND_WORDS[seen[item.name]]} "
                                            f"(data sources, segments and tasks share one namespace)", where))
                continue
            seen[item.name] = kind
            graph.add_node(item.name, kind=kind)
    for i, seg in enumerate(spec.segments):
        for j, src in enumerate(seg.inputs):
            where = f"{source}: segments[{i}]({seg.name}).inputs[{j}]"
            if src in seg.inputs[:j]:
                problems.append(ConfigError(f"input {src!r} is listed twice (also inputs[{seg.inputs.index(src)}])",
                                            where))
            elif src not in graph or graph.nodes[src]["kind"] == "task":
                problems.append(ConfigError(f"unknown input {src!r} (not a data source or segment)", where))
            else:
                graph.add_edge(src, seg.name)
    for i, task in enumerate(spec.tasks):
        where = f"{source}: tasks[{i}]({task.name})"
        if graph.nodes.get(task.output, {}).get("kind") != "segment":
            problems.append(ConfigError(f"output {task.output!r} is not a segment", f"{where}.output"))
        else:
            graph.add_edge(task.output, task.name)
        if graph.nodes.get(task.labels, {}).get("kind") != "data":
            problems.append(ConfigError(f"labels {task.labels!r} is not a data source", f"{where}.labels"))
        else:
            graph.add_edge(task.labels, task.name)
    if problems:
        raise ConfigErrors(problems)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    path = " -> ".join([cycle[0][0]] + [v for _, v in cycle])
    raise ConfigErrors([ConfigError(f"segments form a cycle: {path}", f"{source}: segments")])


def placement_of(spec: TopologySpec, by_lane: dict[str, tuple[str, ...]], source: str) -> dict[str, tuple[str, ...]]:
    placement: dict[str, tuple[str, ...]] = {}
    problems = []
    groups: tuple[tuple[str, Sequence[Any]], ...] = (("data", spec.data), ("segments", spec.segments))
    for key, items in groups:
        for i, item in enumerate(items):
            if item.node not in by_lane:
                problems.append(ConfigError(
                    f"is placed on unknown node {item.node!r} (nodes: {', '.join(by_lane)})",
                    f"{source}: {key}[{i}]({item.name}).node"))
            else:
                placement[item.name] = by_lane[item.node]
    if problems:
        raise ConfigErrors(problems)
    return placement


def load_topology(path: str | Path, infer_shapes: bool = True, overrides=None) -> Topology:
    """Load, expand, build the graph and run every check; raises ConfigError (ConfigErrors for several).
    `overrides`: `--set` key paths and values applied before validation (meshsl.config.overrides)."""
    path = Path(path)
    spec = load_spec(path, overrides)
    return topology_from_spec(spec, str(path), path.parent, infer_shapes)


def topology_from_spec(spec, source, base_dir, infer_shapes=True, check=None, shape_inference=None) -> Topology:
    check = check or check_topology
    spec = resolve_model_dirs(spec, base_dir)
    first_index: dict[str, int] = {}
    duplicates = []
    for i, node in enumerate(spec.nodes):
        if node.name in first_index:
            duplicates.append(ConfigError(f"duplicate node name {node.name!r} (also nodes[{first_index[node.name]}])",
                                          f"{source}: nodes[{i}]({node.name}).name"))
        first_index.setdefault(node.name, i)
    if duplicates:  # checked first: expansion and placement would silently keep only one of them
        raise ConfigErrors(duplicates)
    if spec.clients:
        unknown = [n for n in spec.clients.replicate if n not in first_index]
        if unknown:
            raise ConfigError(f"unknown node(s) {', '.join(map(repr, unknown))} (nodes: {', '.join(first_index)})",
                              f"{source}: clients.replicate")
    lanes, nodes, by_lane = expand_nodes(spec)
    owners: dict[str, str] = {}
    for declared, copies in by_lane.items():
        for concrete in dict.fromkeys(copies):
            other = owners.setdefault(concrete, declared)
            if other != declared:
                replicated = declared if concrete != declared else other
                raise ConfigError(f"node name {concrete!r} would be used twice: by node {concrete!r} and by a copy "
                                  f"of replicated node {replicated!r} (its copies are named "
                                  f"{', '.join(dict.fromkeys(by_lane[replicated]))}); rename one of them",
                                  f"{source}: clients.replicate")
    graph = build_graph(spec, source)
    placement = placement_of(spec, by_lane, source)
    topology = Topology(spec=spec, source=source, base_dir=Path(base_dir), lanes=lanes, nodes=nodes,
                        placement=placement, graph=graph)
    check(topology)
    if infer_shapes:
        if shape_inference is None:
            from meshsl.topology.shapes import infer_shapes as shape_inference  # torch: only shape inference needs it
        shape_inference(topology)
        check_batch_size(topology)  # needs the data's row count, which shape inference has loaded
    return topology
