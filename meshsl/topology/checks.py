"""Structural and privacy checks of a topology; each problem names the file and key path."""
from __future__ import annotations

import networkx as nx

from meshsl.align.ids import uses_ids
from meshsl.config.loader import ConfigErrors
from meshsl.errors import ConfigError, TopologyError
from meshsl.schedule.steps import sample_pools
from meshsl.topology.expand import lane_node_name


def _declared_keys(topology) -> dict[str, str]:
    """Concrete node name -> key path of the declaring entry, e.g. 'clinic2' -> 'nodes[0](clinic)'."""
    replicated = set(topology.spec.clients.replicate) if topology.spec.clients else set()
    keys: dict[str, str] = {}
    for i, node in enumerate(topology.spec.nodes):
        names = [lane_node_name(node.name, lane) for lane in range(topology.lanes)] if node.name in replicated \
            else [node.name]
        for name in names:
            keys.setdefault(name, f"nodes[{i}]({node.name})")
    return keys


_LOOPBACK_NAMES = {"localhost": "127.0.0.1", "localhost.localdomain": "127.0.0.1", "ip6-localhost": "[::1]",
                   "::1": "[::1]"}


def same_endpoint_key(endpoint: str) -> str:
    """One spelling per socket address: `tcp://localhost:P` and `tcp://127.0.0.1:P` are the same port."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    host = _LOOPBACK_NAMES.get(host.lower(), host.lower())
    return f"tcp://{host}:{port}"


def check_batch_size(topology) -> None:
    """A batch larger than all training rows together can never be filled: a typo, not a setting."""
    if uses_ids(topology):
        return  # rows are known after the private set intersection; the alignment checks its own minimum
    rows = sum(len(pool) for pool in sample_pools(topology).train)
    batch = topology.spec.training.batch_size
    if batch > rows:
        raise TopologyError(f"batch_size {batch} exceeds the {rows} training rows of the data; "
                            f"use at most {rows}", f"{topology.source}: training.batch_size")


def talking_pairs(topology) -> dict[frozenset, str]:
    """Pairs of nodes that exchange messages directly -> why (the first reason found): the coordinator
    with every node (control, heartbeats, recovery), and the two ends of every segment edge that crosses
    nodes (activations one way, gradients back)."""
    pairs: dict[frozenset, str] = {}
    declared = topology.spec.training.coordinator
    coordinator = topology.coordinator if not declared or declared in topology.nodes else None
    if coordinator in topology.nodes:
        for name in topology.nodes:
            if name != coordinator:
                pairs.setdefault(frozenset((coordinator, name)), f"{coordinator} coordinates {name}")
    for seg in topology.spec.segments:
        for source in seg.inputs:
            if source not in topology.segments:
                continue
            for lane in range(topology.lanes):
                producer, consumer = topology.node_of(source, lane), topology.node_of(seg.name, lane)
                if producer != consumer:
                    pairs.setdefault(frozenset((producer, consumer)), f"segment {source} feeds {seg.name}")
    return pairs


def _check_dial_out(topology, declared: dict[str, str], problem) -> None:
    """Two dial-out nodes cannot reach each other: neither accepts the other's connection."""
    try:
        pairs = talking_pairs(topology)
    except (KeyError, ValueError):  # placement problems are reported by the checks above
        return
    for pair, why in sorted(pairs.items(), key=lambda item: sorted(item[0])):
        a, b = sorted(pair)
        if topology.nodes[a].inbound or topology.nodes[b].inbound:
            continue
        problem(f"nodes {a!r} and {b!r} both have `inbound: false` but must talk directly ({why}); neither "
                f"can accept the other's connection. Let one of them accept inbound connections (give it an "
                f"endpoint)", f"{declared.get(a, a)}.inbound and {declared.get(b, b)}.inbound")


# Layers whose forward changes state (running statistics, random draws): with steps of several rounds in
# flight the order of forwards depends on timing, so results would too.
_STATEFUL_LAYERS = ("Dropout", "BatchNorm", "InstanceNorm", "RReLU")


def _check_staleness(topology, problem) -> None:
    """`training.staleness > 0` (weight stashing, docs/wan.md) is deterministic only without weight changes by
    the coordinator between steps and without state that in-flight forwards of later steps would touch."""
    spec = topology.spec
    k = spec.training.staleness
    if k <= 0:
        return
    why = f"training.staleness is {k}: steps overlap, so "
    if spec.clients is not None:
        problem(why + f"clients ({spec.clients.mode}) are not supported: averaging or handing weights over between "
                      "steps would race with steps in flight; use staleness 0", "clients")
    if spec.training.label_dp is not None:
        problem(why + "label_dp's random draws would depend on timing; use staleness 0", "training.label_dp")
    for i, edge in enumerate(spec.privacy):
        for key in ("dp", "gradient", "hijack_check"):
            if getattr(edge, key) is not None:
                problem(why + f"{key}'s random draws or probes would depend on timing; use staleness 0",
                        f"privacy[{i}].{key}")
    for i, seg in enumerate(spec.segments):
        for j, layer in enumerate(seg.layers or []):
            name = layer[0] if isinstance(layer, list) and layer else None
            if isinstance(name, str) and any(name.startswith(s) for s in _STATEFUL_LAYERS):
                problem(why + f"layer {name} (running statistics or random draws in forward) would make results "
                              "depend on timing; use staleness 0", f"segments[{i}]({seg.name}).layers[{j}]")


def check_topology(topology) -> None:
    """Every structural check, in a fixed order; raises ConfigErrors naming each problem's key path."""
    problems: list[ConfigError] = []
    src = topology.source

    def problem(message: str, where: str) -> None:
        problems.append(TopologyError(message, f"{src}: {where}"))

    declared = _declared_keys(topology)
    names_seen = _check_node_names(topology.spec, problem)
    _check_endpoints(topology, declared, names_seen, problem)
    _check_metrics_ports(topology, declared, problem)
    _check_data_inputs(topology, problem)
    _check_task_labels(topology, problem)
    _check_every_part_used(topology, problem)
    _check_privacy_entries(topology, problem)
    _check_coordinator(topology, problem)
    _check_dial_out(topology, declared, problem)
    _check_staleness(topology, problem)
    spec = topology.spec
    if spec.security.curve and not spec.security.keys_dir and any(n.public_key is None for n in spec.nodes):
        problem("curve is on but neither keys_dir nor every node's public_key is given", "security")
    if problems:
        raise ConfigErrors(problems)


def _check_node_names(spec, problem) -> dict[str, int]:
    """Declared node name -> its index in `nodes`; a name given twice is a problem."""
    names_seen: dict[str, int] = {}
    for i, node in enumerate(spec.nodes):
        if node.name in names_seen:
            problem(f"duplicate node name {node.name!r} (also nodes[{names_seen[node.name]}])", f"nodes[{i}].name")
        names_seen[node.name] = i
    return names_seen


def _check_endpoints(topology, declared: dict[str, str], names_seen: dict[str, int], problem) -> None:
    """No two nodes (or standbys) bind the same endpoint."""
    replica_hint = (" (copies of a replicated node use the declared port + client index)"
                    if topology.spec.clients else "")
    endpoints_seen: dict[str, str] = {}
    for name, node in topology.nodes.items():
        for k, written in enumerate([node.endpoint, *node.standby]):
            if written is None:  # a dial-out node binds nothing
                continue
            key = f"{declared.get(name, f'nodes({name})')}." + ("endpoint" if k == 0 else f"standby[{k - 1}]")
            endpoint = same_endpoint_key(written)
            if endpoint in endpoints_seen:
                other = endpoints_seen[endpoint]
                problem(f"endpoint {written} is used twice: by {other!r} and by {name!r}"
                        + (replica_hint if other != name and (name not in names_seen or other not in names_seen)
                           else ""), key)
            endpoints_seen[endpoint] = name


def _check_metrics_ports(topology, declared: dict[str, str], problem) -> None:
    ports: dict[tuple[str, int], str] = {}
    for name, node in topology.nodes.items():
        if node.metrics_port:
            host = node.endpoint.split("://", 1)[1].rsplit(":", 1)[0] if (node.endpoint or "").startswith("tcp") \
                else "local"
            if (host, node.metrics_port) in ports:
                problem(f"metrics_port {node.metrics_port} is used by both {ports[(host, node.metrics_port)]!r} "
                        f"and {name!r}", f"{declared.get(name, f'nodes({name})')}.metrics_port")
            ports[(host, node.metrics_port)] = name


def _check_data_inputs(topology, problem) -> None:
    """Raw data feeds only segments on the node holding it; labels feed only tasks."""
    for i, seg in enumerate(topology.spec.segments):
        for j, source in enumerate(seg.inputs):
            data = topology.data.get(source)
            if data is None:
                continue
            where = f"segments[{i}]({seg.name}).inputs[{j}]"
            if data.kind == "labels":
                problem(f"labels {source!r} cannot be a segment input: labels only feed tasks", where)
            for lane in range(topology.lanes):
                data_node, seg_node = topology.node_of(source, lane), topology.node_of(seg.name, lane)
                if data_node == seg_node:
                    continue
                data_party, seg_party = topology.party_of(source, lane), topology.party_of(seg.name, lane)
                if data_party != seg_party:
                    problem(f"raw data {source!r} of party {data_party!r} would cross to party {seg_party!r}: "
                            f"place segment {seg.name!r} on the node holding the data ({data_node!r})", where)
                else:
                    problem(f"data {source!r} is held by node {data_node!r}; segment {seg.name!r} on node "
                            f"{seg_node!r} cannot read it (raw data never travels)", where)
                break


def _check_task_labels(topology, problem) -> None:
    """A task's labels sit on the node that computes its output."""
    for i, task in enumerate(topology.spec.tasks):
        labels = topology.data.get(task.labels)
        if labels is None or task.output not in topology.segments:
            continue
        where = f"tasks[{i}]({task.name})"
        if labels.kind != "labels":
            problem(f"{task.labels!r} holds features, not labels (set kind: labels)", f"{where}.labels")
        for lane in range(topology.lanes):
            label_party, out_party = topology.party_of(task.labels, lane), topology.party_of(task.output, lane)
            if label_party != out_party:
                problem(f"labels {task.labels!r} are held by party {label_party!r} but output {task.output!r} "
                        f"runs on party {out_party!r}: labels or logits would cross a party boundary. Place the "
                        f"output segment on the label holder (U-shaped) or move the labels", where)
                break
            if topology.node_of(task.labels, lane) != topology.node_of(task.output, lane):
                problem(f"labels {task.labels!r} must be on the node that computes output {task.output!r} "
                        f"({topology.node_of(task.output, lane)!r})", where)
                break


def _check_every_part_used(topology, problem) -> None:
    """Every segment feeds a task and every node hosts something (problems); every data source is used (a
    warning)."""
    spec = topology.spec
    task_names = set(topology.tasks)
    for i, seg in enumerate(spec.segments):
        if not (nx.descendants(topology.graph, seg.name) & task_names):
            problem(f"segment {seg.name!r} feeds no task: its gradient would be undefined", f"segments[{i}]({seg.name})")
    hosting = {item.node for item in (*spec.segments, *spec.data)} | {spec.training.coordinator}
    for i, node in enumerate(spec.nodes):
        if node.name not in hosting:
            problem(f"node {node.name!r} holds no segment and no data: it would run an idle process; place a "
                    f"segment on it or remove it (a node that only coordinates is named by training.coordinator)",
                    f"nodes[{i}]({node.name})")
    used = {src for seg in spec.segments for src in seg.inputs} | {t.labels for t in spec.tasks}
    for name in topology.data:
        if name not in used:
            topology.warnings.append(f"{topology.source}: data source {name!r} is not used by any segment or task")


def _check_privacy_entries(topology, problem) -> None:
    """One privacy entry per known segment; one on a segment that crosses no party boundary is a warning."""
    privacy_seen: dict[str, int] = {}
    for i, edge in enumerate(topology.spec.privacy):
        if edge.segment in privacy_seen:
            problem(f"segment {edge.segment!r} already has privacy settings (privacy[{privacy_seen[edge.segment]}]); "
                    f"give one entry per segment", f"privacy[{i}].segment")
        privacy_seen.setdefault(edge.segment, i)
        if edge.segment not in topology.segments:
            problem(f"unknown segment {edge.segment!r}", f"privacy[{i}].segment")
        elif not any(a == edge.segment for a, _ in topology.cut_edges()):
            topology.warnings.append(f"{topology.source}: privacy[{i}]: segment {edge.segment!r} sends nothing "
                                     f"across a party boundary; its privacy settings protect nothing")


def _check_coordinator(topology, problem) -> None:
    spec = topology.spec
    coordinator = spec.training.coordinator
    if coordinator and coordinator not in topology.nodes:
        if spec.clients and coordinator in spec.clients.replicate:
            problem(f"node {coordinator!r} is replicated once per client; the coordinator must be a single node "
                    f"(one that clients.replicate does not list)", "training.coordinator")
        else:
            problem(f"unknown node {coordinator!r} (nodes: {', '.join(topology.nodes)})", "training.coordinator")


def privacy_problems(topology) -> list[ConfigError]:
    """Privacy settings that need the data (class counts, row counts): label-leakage defences that
    cannot run where declared, and DP budgets the declared training would exceed."""
    problems: list[ConfigError] = []
    src = topology.source
    for i, entry in enumerate(topology.spec.privacy):
        defence = entry.gradient
        if defence is None or entry.segment not in topology.segments:
            continue
        for producer, consumer in topology.cut_edges():
            if producer != entry.segment:
                continue
            below = nx.descendants(topology.graph, consumer) | {consumer}
            held = [t for t in topology.spec.tasks if t.output in below and t.loss != "mse"
                    and topology.node_of(t.labels) == topology.node_of(consumer)
                    and topology.party_of(t.labels) != topology.party_of(producer)]
            if defence.defence == "marvell":
                if not held:
                    problems.append(TopologyError(
                        f"marvell needs the labels at the gradient's sender: node {topology.node_of(consumer)!r} "
                        f"(segment {consumer!r}) holds no labels of a task below it; use max_norm or dp",
                        f"{src}: privacy[{i}].gradient"))
                elif any(topology.num_classes.get(t.labels) != 2 for t in held[:1]):
                    problems.append(TopologyError(
                        f"marvell needs binary labels, but {held[0].labels!r} has "
                        f"{topology.num_classes.get(held[0].labels)} classes; use max_norm or dp",
                        f"{src}: privacy[{i}].gradient"))
    crossing = {producer for producer, _ in topology.cut_edges()}
    for i, entry in enumerate(topology.spec.privacy):
        if entry.dp is not None and entry.dp.noise_multiplier is None and entry.segment not in crossing:
            problems.append(TopologyError(
                f"segment {entry.segment!r} sends nothing across a party boundary, so there is no release to "
                f"calibrate target_epsilon against; give noise_multiplier or drop dp", f"{src}: privacy[{i}].dp"))
    for i, entry in enumerate(topology.spec.privacy):
        if entry.hijack_check is None or entry.segment not in topology.segments:
            continue
        node = topology.node_of(entry.segment)
        below = nx.descendants(topology.graph, entry.segment)
        if not any(t.output in below and t.loss != "mse" and topology.node_of(t.labels) == node
                   for t in topology.spec.tasks):
            problems.append(TopologyError(
                f"hijack_check probes the server with fake labels, so node {node!r} must hold the labels of a "
                f"classification task below segment {entry.segment!r} (U-shaped split learning)",
                f"{src}: privacy[{i}].hijack_check"))
    if problems or not any(p.dp is not None or p.gradient is not None for p in topology.spec.privacy):
        return problems
    from meshsl.schedule.accounting import check_budget  # torch (meshsl.privacy's package): parsing must not load it
    try:
        check_budget(topology)
    except ConfigError as exc:
        problems.append(exc)
    return problems
