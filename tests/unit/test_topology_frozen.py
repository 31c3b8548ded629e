"""A Topology is frozen: what is derived from it (sample pools, cut edges, lanes, DP mechanisms,
alignment outcomes) lives beside it, never in its `__dict__`."""
from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest

from meshsl.align.outcomes import alignment_version, outcome_of, predict_mode, remember
from meshsl.align.session import AlignmentOutcome
from meshsl.schedule.steps import sample_pools
from meshsl.schedule.accounting import mechanisms
from meshsl.topology.model import load_topology

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"


@pytest.fixture(scope="module")
def splitfed():
    return load_topology(TOPOLOGIES / "splitfed.yaml")


def test_topology_is_frozen(splitfed):
    with pytest.raises(dataclasses.FrozenInstanceError):
        splitfed.lanes = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        splitfed.extra = "x"


def test_derived_data_leaves_the_topology_unchanged(splitfed):
    before = dict(vars(splitfed))
    pools = sample_pools(splitfed)
    cut = splitfed.cut_edges()
    assert splitfed.lanes_of(splitfed.spec.segments[0].name, splitfed.node_of(splitfed.spec.segments[0].name, 1)) == [1]
    mechanisms(splitfed)
    assert vars(splitfed).keys() == before.keys()
    assert sample_pools(splitfed) is pools  # memoised beside it
    assert splitfed.cut_edges() == cut and cut


def test_alignment_outcomes_are_kept_beside_the_topology_and_renew_the_pools():
    topology = load_topology(TOPOLOGIES / "vanilla.yaml")
    keys = set(vars(topology))
    version = alignment_version(topology)
    outcome = AlignmentOutcome(10, [str(i) for i in range(10)])
    remember(topology, "server", outcome)
    assert outcome_of(topology, "server") is outcome and outcome_of(topology) is outcome
    assert alignment_version(topology) == version + 1 and not predict_mode(topology)
    remember(topology, "server", outcome, predict=True)
    assert predict_mode(topology) and outcome_of(topology, "server", predict=True) is outcome
    assert set(vars(topology)) == keys
    fresh = load_topology(TOPOLOGIES / "vanilla.yaml")
    assert outcome_of(fresh) is None and not predict_mode(fresh)  # keyed by the object, not its content


def test_the_registry_does_not_keep_a_topology_alive():
    import weakref
    topology = load_topology(TOPOLOGIES / "vanilla.yaml")
    sample_pools(topology)
    topology.cut_edges()
    remember(topology, "server", AlignmentOutcome(1, ["a"]))
    ref = weakref.ref(topology)
    del topology
    gc.collect()
    assert ref() is None
