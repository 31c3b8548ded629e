"""The state machine's schedule is exactly the one its rules define, on random wirings and event orders.

`reference_next_compute` is the straightforward scan over every unit (the machine's original
implementation); the machine keeps per-segment heaps instead so a server with a unit per client does not
scan them all per event. Every choice the machine makes is compared with the scan's."""
from __future__ import annotations

import random

import pytest

from meshsl.machines import node as m


def reference_next_compute(machine: m.NodeMachine):
    forwards, backwards = [], []
    for (segment, lane, mb), unit in machine.units.items():
        if not unit.forwarded:
            if not unit.inputs_missing:
                forwards.append((mb, lane, segment))
        elif not unit.backwarded and not unit.grads_missing:
            backwards.append((mb, lane, segment))
    first_open: dict[str, tuple] = {}
    if machine.deterministic:
        for (segment, lane, mb), unit in machine.units.items():
            if not unit.backwarded and (segment not in first_open or (mb, lane) < first_open[segment]):
                first_open[segment] = (mb, lane)
        backwards = [b for b in backwards if (b[0], b[1]) == first_open[b[2]]]
    if machine.schedule == "1f1b":
        if backwards:
            mb, lane, segment = min(backwards)
            return m.Backward(machine.round, segment, lane, mb)
        forwards = [f for f in forwards if machine.in_flight[f[2]] < machine.wiring.segments[f[2]].window
                    or first_open.get(f[2]) == (f[0], f[1])]
    if forwards:
        mb, lane, segment = min(forwards)
        return m.Forward(machine.round, segment, lane, mb)
    if backwards:
        mb, lane, segment = min(backwards)
        return m.Backward(machine.round, segment, lane, mb)
    return None


class CheckedMachine(m.NodeMachine):
    choices = 0

    def next_compute(self):
        if self.pending_commit is not None:
            return super().next_compute()
        expected = reference_next_compute(self)
        got = super().next_compute()
        assert got == expected, (got, expected)
        CheckedMachine.choices += 1
        return got


def random_wiring(rng: random.Random, lanes: int) -> m.Wiring:
    """Segments s0..sk in topological order; each lane of each segment is here ("me") or on a peer."""
    count = rng.randint(1, 5)
    inputs = {}
    for i in range(count):
        earlier = [f"s{j}" for j in range(i)]
        inputs[f"s{i}"] = rng.sample(earlier, rng.randint(0 if i == 0 else 1, min(2, len(earlier))))
    consumers = {s: [c for c in inputs if s in inputs[c]] for s in inputs}
    depth = {}
    for s in reversed(list(inputs)):
        depth[s] = 1 + max((depth[c] for c in consumers[s]), default=0)
    node_of = {}
    for s in inputs:
        mode = rng.choice(["local", "remote", "mixed"])
        node_of[s] = tuple("me" if mode == "local" or (mode == "mixed" and rng.random() < 0.5) else f"peer{lane}"
                           for lane in range(lanes))
    segments = {}
    for s in inputs:
        mine = tuple(lane for lane in range(lanes) if node_of[s][lane] == "me")
        if mine:
            segments[s] = m.SegmentWiring(name=s, lanes=mine, inputs=("x", *inputs[s]),
                                          segment_inputs=tuple(inputs[s]), consumers=tuple(consumers[s]),
                                          window=depth[s])
    return m.Wiring(node="me", segments=segments, node_of=node_of)


def drive(rng: random.Random, machine: m.NodeMachine, rounds: int, lanes: int, micro_batches: int) -> None:
    wiring = machine.wiring
    round_ = 0
    for _ in range(rounds):
        round_ += 1
        phase = rng.choice(["train", "train", "eval"])
        active = tuple(sorted(rng.sample(range(lanes), rng.randint(1, lanes))))
        # Remote producers' activations for our units, in random order, some before our Begin (held).
        pending = [m.InputArrived(round_, seg.name, src, lane, mb)
                   for seg in wiring.segments.values() for src in seg.segment_inputs for lane in seg.lanes
                   if lane in active and not wiring.is_local(src, lane) for mb in range(micro_batches)]
        rng.shuffle(pending)
        running = None
        early = pending[:rng.randint(0, len(pending))] if round_ > 1 else []
        pending = pending[len(early):]
        for event in early:
            assert machine.handle(event) == []
        outputs = list(machine.handle(m.BeginRound(round_, phase, active, micro_batches)))
        done = False
        while True:
            for action in outputs:
                if isinstance(action, (m.Forward, m.Backward, m.ApplyOptimizer)):
                    assert running is None
                    running = action
                elif isinstance(action, m.SendActivation) and phase == "train":
                    pending.append(m.GradientArrived(round_, action.producer, action.consumer, action.lane,
                                                     action.micro_batch))
                elif isinstance(action, m.RoundDone):
                    assert all(u.backwarded for u in machine.units.values())
                    done = True
            outputs = []
            if not done:
                assert not machine.units or not all(u.backwarded for u in machine.units.values())
            if done and running is None and not pending:
                break
            assert running is not None or pending, "deadlock"
            if running is not None and (not pending or rng.random() < 0.5):
                finished, running = running, None
                outputs = machine.handle(m.ComputeFinished(finished))
            else:
                outputs = machine.handle(pending.pop(rng.randrange(len(pending))))
        if phase == "train":
            outputs = machine.handle(m.CommitRound(round_))
            assert isinstance(outputs[0], m.ApplyOptimizer)
            assert machine.handle(m.ComputeFinished(outputs[0])) == []


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_schedule_matches_the_scan(schedule, deterministic):
    rng = random.Random(f"{schedule}-{deterministic}")
    CheckedMachine.choices = 0
    for _ in range(150):
        lanes = rng.randint(1, 6)
        wiring = random_wiring(rng, lanes)
        machine = CheckedMachine(wiring, schedule, deterministic=deterministic)
        drive(rng, machine, rounds=3, lanes=lanes, micro_batches=rng.randint(1, 3))
    assert CheckedMachine.choices > 1000


def test_server_with_many_lanes_schedules_in_lane_order():
    """A SplitFed server: one `top` unit per client lane, inputs arriving in random order."""
    lanes = 2000
    wiring = m.Wiring(node="server", segments={"top": m.SegmentWiring(
        name="top", lanes=tuple(range(lanes)), inputs=("bottom",), segment_inputs=("bottom",), consumers=(),
        window=1)}, node_of={"bottom": tuple(f"c{i}" for i in range(lanes)), "top": ("server",) * lanes})
    machine = m.NodeMachine(wiring, "1f1b", deterministic=True)
    rng = random.Random(0)
    order = list(range(lanes))
    rng.shuffle(order)
    machine.handle(m.BeginRound(1, "train", tuple(range(lanes)), 1))
    computed, running = [], None
    arrivals = iter(order)
    while len(computed) < 2 * lanes:
        lane = next(arrivals, None)
        actions = machine.handle(m.InputArrived(1, "top", "bottom", lane, 0)) if lane is not None else []
        if running is None:
            running = next((a for a in actions if isinstance(a, (m.Forward, m.Backward))), None)
        elif lane is None or rng.random() < 0.5:
            computed.append(running)
            actions = machine.handle(m.ComputeFinished(running))
            running = next((a for a in actions if isinstance(a, (m.Forward, m.Backward))), None)
    backwards = [a.lane for a in computed if isinstance(a, m.Backward)]
    assert backwards == list(range(lanes))  # deterministic: fixed float sums on the server
    assert machine.done
