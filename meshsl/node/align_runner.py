"""Running the alignment: inside a node before training, or for every node in this process.

The outcome is kept per node by `meshsl.align.outcomes`, where the sample pools (`meshsl.schedule.steps`)
and the node's data (`meshsl.compute.node_data`) find it: row i of every source is then the i-th common
sample in the agreed order. A node that checkpoints also keeps
its outcome next to its checkpoints, so a node restarted with --resume rejoins training without
asking its peers (who are past alignment) for a new PSI.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from meshsl.align.ids import data_nodes, id_column_of, leader_of, node_ids, read_node_ids, uses_ids
from meshsl.align.outcomes import (  # noqa: F401  (re-exported: the runner's public names)
    aligned_rows, aligned_size, alignment_settings, enter_predict_mode, intersect_locally, outcome_of, predict_mode,
    remember)
from meshsl.align.session import AlignmentError, AlignmentOutcome, Session
from meshsl.errors import ConfigError, MeshslError
from meshsl.transport.inprocess import InProcessHub, InProcessTransport

log = logging.getLogger("meshsl.align")
CACHE_FILE = "alignment.json"


def session_for(topology, node: str, transport) -> Session:
    timeout_s, minimum = alignment_settings(topology)
    members = data_nodes(topology)
    observers = [n for n in topology.nodes if n not in members]
    return Session(transport, node, topology.hash, leader_of(topology), members, observers, timeout_s, minimum)


def _with_context(topology, node: str, exc: AlignmentError) -> AlignmentError:
    party = topology.nodes[node].party
    held = node_ids(topology, node).origin if node in data_nodes(topology) else "no data"
    return AlignmentError(f"{exc.message} [node {node!r}, party {party!r}: {held}]", f"{topology.source}: {exc.where}")


async def align_node(topology, node: str, transport, checkpoint_dir: Optional[Path] = None,
                     resume: bool = False, predict_ids: Optional[list[str]] = None) -> AlignmentOutcome:
    """This node's side of the alignment over its (started) transport; raises AlignmentError.
    `predict_ids`: align these (a prediction input's ids) instead of the training data's."""
    predict = predict_ids is not None or predict_mode(topology)
    if predict:
        ids = predict_ids
        checkpoint_dir = None
    else:
        ids = node_ids(topology, node).ids if node in data_nodes(topology) else None
    digest = _digest(topology, ids)
    cache = Path(checkpoint_dir, node, CACHE_FILE) if checkpoint_dir is not None else None
    if resume and cache is not None and cache.is_file():
        outcome = _load(cache, digest)
        if outcome is not None:
            log.warning("%s: sample-id alignment restored from %s (%d common samples)", node, cache, outcome.size)
            remember(topology, node, outcome)
            return outcome
    try:
        outcome = await session_for(topology, node, transport).run(ids)
    except AlignmentError as exc:
        if predict:
            raise AlignmentError(f"{exc.message} [prediction inputs; node {node!r}, party "
                                 f"{topology.nodes[node].party!r}]", f"{topology.source}: {exc.where}") from None
        raise _with_context(topology, node, exc) from None
    log.info("%s: %d common samples after PSI (%.2fs)", node, outcome.size, outcome.seconds)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"digest": digest, "size": outcome.size, "ids": outcome.ids}))
        tmp.replace(cache)
    remember(topology, node, outcome, predict)
    return outcome


async def align_before_training(runtime) -> Optional[bool]:
    """The node's hook: None when rows match by position (nothing done, transport not started);
    True after a successful alignment (transport started); False on failure (runtime.failure set)."""
    topology = runtime.topology
    if not uses_ids(topology):
        return None
    await runtime.transport.start()
    try:
        predict_ids = None
        if runtime.inference is not None:  # `meshsl predict`: align the prediction inputs' ids instead
            enter_predict_mode(topology)
            predict_ids = _prediction_ids(runtime)
        await align_node(topology, runtime.node, runtime.transport,
                         runtime.checkpoint_dir if runtime.checkpoint_every > 0 else None, runtime.resume,
                         predict_ids)
    except MeshslError as exc:
        runtime.failure = str(exc)
        log.error("%s: %s", runtime.node, exc)
        if runtime.coordinator is not None:
            runtime.coordinator.exception = exc
        return False
    return True


def _prediction_ids(runtime) -> Optional[list[str]]:
    topology, node = runtime.topology, runtime.node
    if node not in data_nodes(topology):
        return None
    path = runtime.inference.input_path
    if path is None:
        raise ConfigError(f"node {node!r} holds data, so it takes part in matching the prediction inputs by sample "
                          f"id; give it --predict-input FILE with an id column {id_column_of(topology, node)!r}",
                          "--predict-input")
    return read_node_ids(topology, node, path)


def _digest(topology, ids: Optional[list[str]]) -> str:
    h = hashlib.sha256(topology.hash.encode())
    for value in ids or ():
        h.update(value.encode() + b"\n")
    return h.hexdigest()


def _load(cache: Path, digest: str) -> Optional[AlignmentOutcome]:
    try:
        saved = json.loads(cache.read_text())
        if saved.get("digest") != digest:
            return None
        return AlignmentOutcome(int(saved["size"]), saved["ids"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- every node in this process -----------------------------------------------------------------
async def align_all(topology, traffic_hook=None) -> dict[str, AlignmentOutcome]:
    """Every node's side of the alignment on its own in-process transport, concurrently (the real
    protocol, only the wire is a queue); `traffic_hook(sender, peer, frames)` sees every message."""
    hub = InProcessHub()
    book = {name: f"inproc://meshsl-align-{name}" for name in topology.nodes}
    transports = {name: InProcessTransport(name, book[name], book, queue_size=16, hub=hub) for name in topology.nodes}
    for transport in transports.values():
        transport.sent_hook = traffic_hook
        await transport.start()
    try:
        results = await asyncio.gather(*(align_node(topology, name, transports[name]) for name in topology.nodes),
                                       return_exceptions=True)
    finally:
        for transport in transports.values():
            await transport.close()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return dict(zip(topology.nodes, results))


def align_locally(topology, traffic_hook=None) -> dict[str, AlignmentOutcome]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(align_all(topology, traffic_hook))
    raise AlignmentError("the sample-id alignment has not run on this node yet", "alignment")
