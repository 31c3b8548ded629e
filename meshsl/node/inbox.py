"""A node's checks on what arrives: who sent it, for which topology, and (for tensors) on which edge,
lane and size; an accepted activation or gradient is stored and fed to the state machine.

Every refusal is a ProtocolError with a reason, counted by the node, which keeps running."""
from __future__ import annotations

import logging

from meshsl.errors import ProtocolError
from meshsl.protocol.envelope import Envelope, Kind
from meshsl.protocol.frames import decode_message
from meshsl.machines import node as m
from meshsl.node.wire import EdgeCodecs, max_rows
from meshsl.transport.base import SPOOFED_PREFIX

log = logging.getLogger("meshsl.node")


class NodeInbox:
    """`edges`: the topology's edges by name; `lane`: the node's ComputeLane; `work`: its NodeWork;
    `metrics`: returns the node's metrics (None: none)."""

    def __init__(self, topology, node: str, edges: dict, codecs: EdgeCodecs, lane, work, counters, metrics) -> None:
        self.topology = topology
        self.node = node
        self.edges = edges
        self.codecs = codecs
        self.lane = lane
        self.work = work
        self.counters = counters
        self._metrics = metrics
        self.max_message_bytes = topology.spec.security.max_message_bytes

    def accept(self, sender: str, frames: list) -> tuple[Envelope, list]:
        """The message decoded, once its sender and topology are checked."""
        if sender.startswith(SPOOFED_PREFIX):  # CURVE identity and routing id disagree
            raise ProtocolError("spoofed_sender", "routing id differs from the authenticated node", sender[1:])
        envelope, tensors = decode_message(frames, self.max_message_bytes)
        if envelope.topology != self.topology.hash:
            raise ProtocolError("wrong_topology", f"topology hash {envelope.topology[:20]!r}", sender)
        if envelope.sender != sender:
            raise ProtocolError("spoofed_sender", f"header names {envelope.sender[:64]!r}", sender)
        if sender not in self.topology.nodes:
            raise ProtocolError("unknown_peer", "not a node of this topology", sender)
        return envelope, tensors

    def on_tensor(self, sender: str, envelope: Envelope, tensors: list) -> list:
        """Store an activation or gradient and return the machine's actions."""
        edge = self.edges.get(envelope.edge)
        if edge is None:
            raise ProtocolError("unknown_edge", f"edge {envelope.edge[:64]!r}", sender)
        lane, mb = envelope.lane, envelope.micro_batch
        if lane >= self.topology.lanes:
            raise ProtocolError("bad_lane", f"lane {lane}", sender)
        forward = envelope.kind == Kind.ACTIVATION
        expected_sender = self.topology.node_of(edge.producer if forward else edge.consumer, lane)
        receiver = self.topology.node_of(edge.consumer if forward else edge.producer, lane)
        if receiver != self.node or expected_sender != sender:
            raise ProtocolError("wrong_peer", f"{envelope.edge} lane {lane} is not between {sender} and me", sender)
        if len(envelope.tensors) != 1:
            raise ProtocolError("bad_frame_count", "one tensor per activation/gradient message", sender)
        training = self.topology.spec.training
        rows = max_rows(training.batch_size, training.micro_batches) if envelope.phase == "train" \
            else max(training.eval_batch_size, training.batch_size)
        tensor = self.codecs.decode(edge, "act" if forward else "grad", envelope.tensors[0], tensors[0], rows)
        event: m.Arrival
        if forward:
            event = m.InputArrived(envelope.step, edge.consumer, edge.producer, lane, mb)
        else:
            event = m.GradientArrived(envelope.step, edge.producer, edge.consumer, lane, mb)
        store = self.work.worker.store
        with self.lane.lock:  # the compute thread may pick the unit up as soon as the lock is released
            actions = self.lane.machine.handle(event)  # raises (and stores nothing) for unexpected messages
            if forward:
                store.inputs[(envelope.step, edge.consumer, edge.producer, lane, mb)] = tensor
            else:
                store.grads[(envelope.step, edge.producer, lane, mb)].append((edge.consumer, tensor))
        nbytes = sum(p.nbytes for p in tensors[0])
        self.counters.add_bytes(edge.name, ("forward" if forward else "backward") + "_received", nbytes)
        metrics = self._metrics()
        if metrics:
            metrics.message(edge.name, "received", nbytes)
        return actions

    # -- refusals: counted by reason, logged; the node keeps running ---------------------------------
    def rejected(self, sender: str, exc: ProtocolError) -> None:
        self.counters.reject(exc.reason)
        metrics = self._metrics()
        if metrics:
            metrics.rejected(exc.reason)
        log.warning("%s: rejected message from %r: %s", self.node, sender[:64], exc)

    def auth_refused(self, reason: str) -> None:
        """A peer failed CURVE authentication (unknown key, plain text): counted, never let in."""
        self.counters.reject(f"auth_{reason}")
        metrics = self._metrics()
        if metrics:
            metrics.auth_refused()
        log.warning("%s: refused a connection (%s)", self.node, reason)

    def connection_dropped(self, shutting_down: bool = False) -> None:
        """The socket dropped a connection: a frame above the message limit (refused unread, so it is
        counted here) or a peer that went away; the socket cannot tell which. Once the run is ending
        (`shutting_down`) peers leave as they should: nothing is counted, nothing said above DEBUG."""
        if shutting_down:
            log.debug("%s: a peer disconnected as the run ended", self.node)
            return
        self.counters.reject("connection_dropped")
        metrics = self._metrics()
        if metrics:
            metrics.rejected("connection_dropped")
        log.info("%s: a connection was dropped (a frame above %s bytes, or the peer left)", self.node,
                 self.max_message_bytes)
