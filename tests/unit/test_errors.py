"""Every meshsl error crosses a process boundary intact: pickled, or as plain (JSON) data."""
from __future__ import annotations

import inspect
import json
import pickle

import pytest

from meshsl import errors
from meshsl.errors import (AlignmentError, AuthError, CheckpointError, ConfigError, ConfigErrors, DataError,
                           MeshslError, NodesLost, PartyOffline, PeerFailed, PeerTimeout, PrivacyBudgetError, ProtocolError,
                           PreflightError, RunAborted, RunCancelled, TopologyError, TransportError, KitTampered,
                           SignatureInvalid, JobRefused, JobFailed)

pytestmark = pytest.mark.unit

EXAMPLES = [
    MeshslError("something"),
    ConfigError("unknown key", "t.yaml: nodes[0](client).endpoint"),
    TopologyError("segments form a cycle", "t.yaml: segments"),
    DataError("dataset has no labels", "t.yaml: data[1](labels).dataset"),
    ConfigErrors([ConfigError("first", "t.yaml: a"), TopologyError("second", "t.yaml: b")]),
    AlignmentError("300 samples in common, fewer than 301", "t.yaml: alignment"),
    PrivacyBudgetError("epsilon 9.1 exceeds 8", "t.yaml: privacy[0].dp"),
    ProtocolError("bad_shape", "edge a->b: (3, 4) != (3, 5)", peer="client"),
    TransportError("cannot bind tcp://127.0.0.1:1"),
    PeerTimeout("server", 12.5, "say hello"),
    PartyOffline("hospital_b", 30.0, "party b"),
    KitTampered("kit /kit: file site.json was changed after provisioning"),
    SignatureInvalid("job 0123456789abcdef is not signed (no signature)"),
    JobRefused("0123456789abcdef", {"hospital_b": "column 'worst area' is forbidden"}),
    JobFailed("0123456789abcdef", "aborted", {"lab": "aborted by alice"}),
    PeerFailed("client", "exit code 1"),
    RunAborted("server", "loss is NaN"),
    NodesLost({"relay_2"}, "no heartbeat for 5.0s", cause="heartbeat"),
    CheckpointError("no common checkpoint"),
    AuthError("client.key_secret is missing"),
    PreflightError("node 'lab' asks for device 'cuda'", "t.yaml: nodes[2](lab).device"),
    RunCancelled(12, "runs/vertical"),
]


def test_every_error_class_has_an_example():
    classes = {cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, MeshslError)}
    assert classes == {type(e) for e in EXAMPLES}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_pickle_keeps_type_message_and_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args
    assert {k: str(v) for k, v in vars(copy).items()} == {k: str(v) for k, v in vars(error).items()}


def _shown(value) -> str:
    """As plain data a set comes back as a (sorted) list: compare those by their items."""
    return str(sorted(value)) if isinstance(value, (set, frozenset)) else str(value)


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_plain_data_round_trip(error):
    data = json.loads(json.dumps(error.as_data()))
    copy = MeshslError.from_data(data)
    assert type(copy) is type(error) and str(copy) == str(error)
    assert {k: _shown(v) for k, v in vars(copy).items()} == {k: _shown(v) for k, v in vars(error).items()}


def test_an_unknown_type_comes_back_as_the_base_error():
    copy = MeshslError.from_data({"type": "NotOurs", "message": "from a newer peer", "fields": {"x": 1}})
    assert type(copy) is MeshslError and str(copy) == "from a newer peer" and copy.x == 1
