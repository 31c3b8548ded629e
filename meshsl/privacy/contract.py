"""The control-message half of the privacy contract: figures about a party's data or labels that travel
to the coordinator's party in control messages (not tensors), listed by `meshsl plan`.

Each step every node reports to the coordinator in its DONE message; what it reports follows from
what it hosts (see `SegmentWorker.round_summary`):

* a node computing a task's loss: the step's loss_sum / correct / count of that task (a function of
  the label holder's labels), and after evaluation the task's metrics and confusion matrix;
* a node producing a cut activation: the live dCor reading between its raw inputs and what it sends;
* a label holder sending gradients over a cut: the live label-attack AUCs, realistic and upper bound
  (scored with its labels);
* a node applying a DP mechanism (or holding labels under label DP): the epsilon spent so far;
* a client running the hijacking probe: its verdict.

Operational figures (bytes, seconds, rejected-message counts) travel too; they say nothing about data.
"""
from __future__ import annotations

import networkx as nx


def control_figures(topology) -> list[dict]:
    """Per (node, figure) that crosses a party boundary to reach the coordinator."""
    coordinator = topology.coordinator
    to_party = topology.nodes[coordinator].party
    rows: list[dict] = []

    def add(node: str, figure: str, about: str, when: str) -> None:
        party = topology.nodes[node].party
        if party != to_party:
            rows.append({"node": node, "party": party, "to": coordinator, "to_party": to_party,
                         "figure": figure, "about": about, "when": when})

    cut = topology.cut_edges()
    dp_segments = {p.segment for p in topology.spec.privacy if p.dp is not None}
    gradient_dp = {p.segment for p in topology.spec.privacy if p.gradient is not None and p.gradient.defence == "dp"}
    for lane in range(topology.lanes):
        for task in topology.spec.tasks:
            node = topology.node_of(task.output, lane)
            labels = f"labels {task.labels!r} of {topology.party_of(task.labels, lane)}"
            if task.loss == "mse":  # a regression: no classes, so no accuracy, metrics or confusion matrix
                add(node, f"task {task.name}: loss_sum, count", labels, "every training step")
                add(node, f"task {task.name}: eval loss", labels, "every evaluation")
                continue
            add(node, f"task {task.name}: loss_sum, correct, count", labels, "every training step")
            add(node, f"task {task.name}: eval loss, {', '.join(task.metrics)}, confusion matrix", labels,
                "every evaluation")
        for producer, consumer in cut:
            node = topology.node_of(producer, lane)
            if topology.party_of(producer, lane) == topology.party_of(consumer, lane):
                continue
            upstream = nx.ancestors(topology.graph, producer)
            if any(d.kind == "features" and n in upstream and topology.node_of(n, lane) == node
                   for n, d in topology.data.items()):  # the reading needs the raw inputs at hand
                add(node, f"dCor reading of edge {producer}->{consumer}",
                    f"raw inputs of {topology.party_of(producer, lane)}", "every 10th training step")
            if producer in dp_segments:
                add(node, f"epsilon spent on edge {producer}->{consumer}", "activation DP budget", "every step")
            below = nx.descendants(topology.graph, consumer) | {consumer}
            sender = topology.node_of(consumer, lane)
            held = [t for t in topology.spec.tasks if t.output in below and t.loss != "mse"
                    and topology.node_of(t.labels, lane) == sender
                    and topology.party_of(t.labels, lane) != topology.party_of(producer, lane)]
            if held:
                add(sender, f"label-attack AUCs (realistic, upper bound) of edge {producer}->{consumer}",
                    f"labels {held[0].labels!r} of {topology.party_of(held[0].labels, lane)}",
                    "every 10th training step (binary labels)")
            if producer in gradient_dp:
                add(sender, f"epsilon spent on edge {producer}->{consumer}", "gradient DP budget", "every step")
        for entry in topology.spec.privacy:
            if entry.hijack_check is not None and entry.segment in topology.segments:
                add(topology.node_of(entry.segment, lane), f"hijack-check verdict of segment {entry.segment} "
                    f"(score, probes)", "the gradients it received", "every training step")
        if topology.spec.training.label_dp is not None:
            for task in topology.spec.tasks:
                if task.loss != "mse":
                    add(topology.node_of(task.labels, lane), f"label DP epsilon of {task.labels}",
                        "label DP budget", "every training step")
    return list({tuple(sorted(r.items())): r for r in rows}.values())
