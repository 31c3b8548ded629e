"""Prometheus metrics for one meshsl node, and the scrape targets that let Prometheus find them.

Every label value is bounded, so a long run cannot blow up Prometheus's series count:

* ``node``, ``segment``, ``edge``, ``task``, ``peer`` and ``queue`` are names from the topology
  (or the runtime's fixed queue names), so their number is fixed for a run;
* ``direction`` is ``forward``/``backward`` for compute and ``sent``/``received`` for messages;
* ``phase`` is ``train``/``eval``;
* ``reason`` (rejected messages) comes from the fixed set of ``ProtocolError.reason`` labels,
  ``kind`` (failovers) from the runtime's fixed set of failover kinds, ``metric`` from the task
  head's metric names.

As a guard against a caller passing free text (an exception message, a peer address) into a
label, each label of the open-ended kinds keeps at most ``MAX_LABEL_VALUES`` distinct values and
maps anything beyond that to ``"other"``.

Each ``NodeMetrics`` owns its own ``CollectorRegistry``, so several logical nodes may live in
one process (tests, in-process transport) without their series colliding.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable, Optional
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server

log = logging.getLogger(__name__)

MAX_LABEL_VALUES = 64
OVERFLOW_LABEL = "other"

# Buckets in seconds: one micro-batch of one segment is sub-millisecond to seconds; a whole
# step and a checkpoint are milliseconds to a minute.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# name -> (kind, help, labels beyond `node`). The single source for registering metrics and for
# EXPORTED_METRICS, so the dashboard test and the code cannot drift apart.
_COUNTERS = {
    "meshsl_microbatches": ("Micro-batches computed by a segment", ("segment", "direction")),
    "meshsl_samples": ("Training samples committed", ()),
    "meshsl_steps": ("Training steps committed", ()),
    "meshsl_bytes": ("Payload bytes exchanged per edge", ("edge", "direction")),
    "meshsl_messages": ("Messages exchanged per edge", ("edge", "direction")),
    "meshsl_rejected_messages": ("Messages dropped as malformed or unexpected", ("reason",)),
    "meshsl_heartbeats": ("Heartbeats received from a peer", ("peer",)),
    "meshsl_failovers": ("Failovers performed, by kind", ("kind",)),
    "meshsl_client_changes": ("Clients dropped from or rejoining the run (clients.on_loss: drop)",
                              ("event", "cause")),
    "meshsl_restarts": ("Times this node (re)started from a checkpoint", ()),
    "meshsl_auth_refusals": ("Connections refused by CURVE authentication", ()),
}
_HISTOGRAMS = {
    "meshsl_stage_compute_seconds": (
        "Compute time of one micro-batch in one segment", ("segment", "direction"), STAGE_BUCKETS),
    "meshsl_step_seconds": ("Wall time of one committed step", (), STEP_BUCKETS),
    "meshsl_checkpoint_seconds": ("Time to write one checkpoint", (), CHECKPOINT_BUCKETS),
    "meshsl_recovery_seconds": ("Time from a lost node being noticed to every node restored", (),
                                CHECKPOINT_BUCKETS),
}
_GAUGES = {
    "meshsl_node_info": ("Static facts about this node (value is always 1)",
                         ("party", "role", "topology", "topology_hash")),
    "meshsl_up": ("1 while the node's exporter is alive", ()),
    "meshsl_current_step": ("Last step this node worked on", ()),
    "meshsl_epoch": ("Current epoch", ()),
    "meshsl_samples_per_second": ("Throughput of the last committed step", ()),
    "meshsl_queue_depth": ("Items waiting in a node-local queue", ("queue",)),
    "meshsl_bubble_fraction": ("Share of the last step a segment sat idle (0..1)", ("segment",)),
    "meshsl_task_loss": ("Last loss of a task head", ("task", "phase")),
    "meshsl_task_metric": ("Last value of a task metric (accuracy, ...)", ("task", "metric", "phase")),
    "meshsl_peer_up": ("1 while a peer answers heartbeats, else 0", ("peer",)),
    "meshsl_edge_leakage_dcor": ("Distance correlation between inputs and an edge's activations",
                                 ("edge",)),
    "meshsl_checkpoint_step": ("Step of the last checkpoint written", ()),
    "meshsl_edge_label_leakage_auc": ("Label-inference AUC an attacker gets from the gradients a label holder "
                                      "sends over an edge, sides chosen without labels, last sampled steps "
                                      "(0.5 chance, 1 labels recovered)", ("edge",)),
    "meshsl_edge_label_leakage_auc_upper_bound": ("Upper bound of that AUC: attack sides chosen with the labels, "
                                                  "labelled reference rows (not what an attacker gets)", ("edge",)),
    "meshsl_privacy_epsilon": ("Privacy budget spent (epsilon at the run's delta) per edge mechanism",
                               ("edge", "mechanism")),
}


def _exposed_names() -> frozenset[str]:
    # Names as they appear in the text exposition; prometheus_client adds _created series for
    # counters and histograms (unless PROMETHEUS_DISABLE_CREATED_SERIES is set).
    names: set[str] = set(_GAUGES)
    for base in _COUNTERS:
        names |= {f"{base}_total", f"{base}_created"}
    for base in _HISTOGRAMS:
        names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}
    return frozenset(names)


EXPORTED_METRICS: frozenset[str] = _exposed_names()


class _BoundedValues:
    """Lets through at most `limit` distinct label values, then answers OVERFLOW_LABEL."""

    def __init__(self, what: str, limit: int = MAX_LABEL_VALUES) -> None:
        self._what = what
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = str(value)
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        log.warning("too many distinct %s label values; counting %r as %r",
                    self._what, value[:40], OVERFLOW_LABEL)
        return OVERFLOW_LABEL


class NodeMetrics:
    """All metrics one node exports, in a registry of its own."""

    def __init__(self, node: str, party: str, role: str, topology: str, topology_hash: str) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self._server: Optional[WSGIServer] = None
        self._thread: Optional[threading.Thread] = None
        self._counters = {name: Counter(name, doc, ("node", *labels), registry=self.registry)
                          for name, (doc, labels) in _COUNTERS.items()}
        self._histograms = {name: Histogram(name, doc, ("node", *labels), buckets=buckets, registry=self.registry)
                            for name, (doc, labels, buckets) in _HISTOGRAMS.items()}
        self._gauges = {name: Gauge(name, doc, ("node", *labels), registry=self.registry)
                        for name, (doc, labels) in _GAUGES.items()}
        self._reason = _BoundedValues("reason")
        self._kind = _BoundedValues("failover kind")
        self._metric_name = _BoundedValues("task metric")
        # Segments, edges, tasks, peers and queues together: generous, a topology is finite.
        self._label = _BoundedValues("topology name", limit=8 * MAX_LABEL_VALUES)

        self._gauges["meshsl_node_info"].labels(node, party, role, topology, topology_hash).set(1)
        self._gauges["meshsl_up"].labels(node).set(1)
        # Single-series metrics start at zero so a scrape shows them before the first event.
        for name in ("meshsl_samples", "meshsl_steps", "meshsl_restarts", "meshsl_auth_refusals"):
            self._counters[name].labels(node)
        for name in ("meshsl_current_step", "meshsl_epoch", "meshsl_samples_per_second"):
            self._gauges[name].labels(node).set(0)

    # -- exporting ---------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1", **tls) -> int:
        """Start the HTTP exporter in a daemon thread; port 0 picks a free port. Returns the port.

        `tls`: prometheus_client's certfile, keyfile, client_cafile, client_auth_required (HTTPS, and
        with a client CA only scrapers holding a certificate it signed get an answer)."""
        if self._server is not None:
            return self._server.server_port
        started = start_http_server(port, addr=addr, registry=self.registry, **tls)
        if started is None:  # prometheus_client < 0.17 returns nothing; the port is then fixed
            return port
        self._server, self._thread = started
        return self._server.server_port

    def close(self) -> None:
        """Stop the HTTP exporter, if serving (lets tests and restarts free the port)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def render(self) -> bytes:
        """The text exposition a scrape would return."""
        return generate_latest(self.registry)

    # -- recording ---------------------------------------------------------------------------

    def recovery(self, seconds: float) -> None:
        """One failover: from the loss being noticed to every node restored."""
        self._histograms["meshsl_recovery_seconds"].labels(self.node).observe(seconds)

    def microbatch(self, segment: str, direction: str, seconds: float) -> None:
        labels = (self.node, self._label(segment), direction)
        self._counters["meshsl_microbatches"].labels(*labels).inc()
        self._histograms["meshsl_stage_compute_seconds"].labels(*labels).observe(seconds)

    def step_done(self, seconds: float, samples: int) -> None:
        self._histograms["meshsl_step_seconds"].labels(self.node).observe(seconds)
        self._counters["meshsl_samples"].labels(self.node).inc(samples)
        self._counters["meshsl_steps"].labels(self.node).inc()
        if seconds > 0:
            self._gauges["meshsl_samples_per_second"].labels(self.node).set(samples / seconds)

    def message(self, edge: str, direction: str, nbytes: int) -> None:
        labels = (self.node, self._label(edge), direction)
        self._counters["meshsl_bytes"].labels(*labels).inc(nbytes)
        self._counters["meshsl_messages"].labels(*labels).inc()

    def rejected(self, reason: str) -> None:
        self._counters["meshsl_rejected_messages"].labels(self.node, self._reason(reason)).inc()

    def queue_depth(self, queue: str, depth: int) -> None:
        self._gauges["meshsl_queue_depth"].labels(self.node, self._label(queue)).set(depth)

    def bubble(self, segment: str, fraction: float) -> None:
        self._gauges["meshsl_bubble_fraction"].labels(self.node, self._label(segment)).set(fraction)

    def task(self, task: str, loss: float, metrics: dict[str, float], phase: str = "train") -> None:
        task = self._label(task)
        self._gauges["meshsl_task_loss"].labels(self.node, task, phase).set(loss)
        for metric, value in metrics.items():
            self._gauges["meshsl_task_metric"].labels(
                self.node, task, self._metric_name(metric), phase).set(value)

    def heartbeat(self, peer: str) -> None:
        self._counters["meshsl_heartbeats"].labels(self.node, self._label(peer)).inc()

    def peer_up(self, peer: str, up: bool) -> None:
        self._gauges["meshsl_peer_up"].labels(self.node, self._label(peer)).set(1 if up else 0)

    def failover(self, kind: str) -> None:
        self._counters["meshsl_failovers"].labels(self.node, self._kind(kind)).inc()

    def client_change(self, event: str, cause: str) -> None:
        """A client dropped (event `drop`, cause: how its loss was noticed) or readmitted (`rejoin`)."""
        self._counters["meshsl_client_changes"].labels(self.node, self._kind(event), self._kind(cause)).inc()

    def restart(self) -> None:
        self._counters["meshsl_restarts"].labels(self.node).inc()

    def leakage(self, edge: str, dcor: float) -> None:
        self._gauges["meshsl_edge_leakage_dcor"].labels(self.node, self._label(edge)).set(dcor)

    def label_leakage(self, edge: str, auc: float, upper_bound: float) -> None:
        self._gauges["meshsl_edge_label_leakage_auc"].labels(self.node, self._label(edge)).set(auc)
        self._gauges["meshsl_edge_label_leakage_auc_upper_bound"].labels(self.node, self._label(edge)).set(upper_bound)

    def privacy_epsilon(self, edge: str, mechanism: str, epsilon: float) -> None:
        self._gauges["meshsl_privacy_epsilon"].labels(self.node, self._label(edge), self._label(mechanism)).set(epsilon)

    def checkpoint(self, seconds: float, step: int) -> None:
        self._histograms["meshsl_checkpoint_seconds"].labels(self.node).observe(seconds)
        self._gauges["meshsl_checkpoint_step"].labels(self.node).set(step)

    def auth_refused(self) -> None:
        self._counters["meshsl_auth_refusals"].labels(self.node).inc()

    def progress(self, step: int, epoch: int) -> None:
        self._gauges["meshsl_current_step"].labels(self.node).set(step)
        self._gauges["meshsl_epoch"].labels(self.node).set(epoch)


def scrape_targets(nodes: Iterable[tuple[str, str, str, int]], topology: str) -> list[dict]:
    """Prometheus file_sd entries, one per (node, party, host, metrics_port).

    Written as JSON to monitoring/targets/*.json, which monitoring/prometheus.yml watches.
    One entry per node so each target carries its own node/party labels.
    """
    return [
        {
            "targets": [f"{host}:{port}"],
            "labels": {"job": "meshsl", "topology": topology, "node": node, "party": party},
        }
        for node, party, host, port in nodes
    ]
