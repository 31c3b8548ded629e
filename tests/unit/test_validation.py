"""Every rejection of issue 2: each test breaks one thing in a valid topology and asserts the message
and the `where` (file and key path) of the error, so a person can find and fix the line."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from meshsl.config.loader import ConfigErrors, load_spec
from meshsl.errors import ConfigError, DataError, TopologyError
from meshsl.topology import load_topology

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"

# A small valid vanilla topology: client (party clinic) holds the pixels and the bottom, server (party lab)
# holds the labels and the top. Tests change one thing each.
BASE = {
    "name": "t",
    "nodes": [
        {"name": "client", "endpoint": "tcp://127.0.0.1:5701", "party": "clinic"},
        {"name": "server", "endpoint": "tcp://127.0.0.1:5702", "party": "lab"},
    ],
    "data": [
        {"name": "pixels", "node": "client", "dataset": {"name": "digits"}},
        {"name": "digit_labels", "node": "server", "dataset": {"name": "digits"}, "kind": "labels"},
    ],
    "segments": [
        {"name": "bottom", "node": "client", "inputs": ["pixels"],
         "layers": [["Linear", 64, 32], ["ReLU"], ["Linear", 32, 32], ["ReLU"]]},
        {"name": "top", "node": "server", "inputs": ["bottom"], "layers": [["Linear", 32, 10]]},
    ],
    "tasks": [{"name": "digit", "output": "top", "labels": "digit_labels"}],
    "training": {"batch_size": 16, "micro_batches": 2},
}


@pytest.fixture
def doc() -> dict:
    return copy.deepcopy(BASE)


def write(tmp_path: Path, document, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False))
    return path


def problems_of(path: Path) -> list[ConfigError]:
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    return list(getattr(info.value, "problems", None) or [info.value])


def assert_problem(problems: list[ConfigError], where: str, *fragments: str, kind: type = ConfigError) -> ConfigError:
    """One of `problems` has exactly this `where` and every fragment in its message."""
    for p in problems:
        if p.where == where and all(f in p.message for f in fragments):
            assert isinstance(p, kind), f"{p!r} is not a {kind.__name__}"
            assert str(p) == f"{where}: {p.message}"
            return p
    listing = "\n".join(f"  where={p.where!r} message={p.message!r}" for p in problems)
    raise AssertionError(f"no problem at {where!r} containing {fragments}; got:\n{listing}")


def rejected(tmp_path: Path, document, where_suffix: str, *fragments: str, kind: type = ConfigError) -> ConfigError:
    path = write(tmp_path, document)
    return assert_problem(problems_of(path), f"{path}: {where_suffix}", *fragments, kind=kind)


def test_base_document_is_valid(tmp_path, doc):
    topology = load_topology(write(tmp_path, doc))
    assert topology.recognised_configurations() == ["vanilla"]
    assert topology.shapes["bottom"] == (32,) and topology.shapes["top"] == (10,)
    assert topology.warnings == []


# ------------------------------------------------------------------ schema: unknown keys, bad values

def test_unknown_top_level_key(tmp_path, doc):
    doc["trainig"] = {"epochs": 1}
    rejected(tmp_path, doc, "trainig", "unknown key")


def test_unknown_nested_key_names_the_entry(tmp_path, doc):
    doc["nodes"][1]["endpoitn"] = "tcp://127.0.0.1:5703"
    rejected(tmp_path, doc, "nodes[1](server).endpoitn", "unknown key")


def test_unknown_key_deep_inside(tmp_path, doc):
    doc["training"]["optimizer"] = {"name": "adam", "lrate": 0.1}
    rejected(tmp_path, doc, "training.optimizer.lrate", "unknown key")
    doc["training"]["optimizer"] = {"name": "adam"}
    doc["data"][0]["dataset"]["test_fraktion"] = 0.1
    rejected(tmp_path, doc, "data[0](pixels).dataset.test_fraktion", "unknown key")


def test_missing_required_key(tmp_path, doc):
    del doc["nodes"][0]["party"]
    rejected(tmp_path, doc, "nodes[0](client).party", "required key is missing")


@pytest.mark.parametrize("endpoint, fragment", [
    ("http://127.0.0.1:5702", "is not an endpoint like tcp://host:port"),
    ("tcp://127.0.0.1", "is not an endpoint like tcp://host:port"),
    ("tcp://127.0.0.1:70000", "port of 'tcp://127.0.0.1:70000' is out of range"),
])
def test_bad_endpoint(tmp_path, doc, endpoint, fragment):
    doc["nodes"][1]["endpoint"] = endpoint
    problem = rejected(tmp_path, doc, "nodes[1](server).endpoint", fragment)
    assert not problem.message.startswith("Value error")  # pydantic's prefix is stripped


def test_bad_standby_endpoint(tmp_path, doc):
    doc["nodes"][1]["standby"] = ["tcp://127.0.0.1:5712", "udp://x:1"]
    rejected(tmp_path, doc, "nodes[1](server).standby[1]", "'udp://x:1' is not an endpoint")


def test_micro_batches_exceed_batch_size(tmp_path, doc):
    doc["training"] = {"batch_size": 8, "micro_batches": 16}
    rejected(tmp_path, doc, "training", "micro_batches (16) exceeds batch_size (8)")


def test_wrong_type(tmp_path, doc):
    doc["training"]["batch_size"] = "many"
    rejected(tmp_path, doc, "training.batch_size", "valid integer")
    doc["training"]["batch_size"] = 16
    doc["nodes"] = "client, server"
    rejected(tmp_path, doc, "nodes", "valid list")


def test_several_problems_are_reported_together(tmp_path, doc):
    doc["nodes"][0]["colour"] = "red"
    doc["training"]["epochs"] = -1
    path = write(tmp_path, doc)
    problems = problems_of(path)
    assert len(problems) == 2
    assert_problem(problems, f"{path}: nodes[0](client).colour", "unknown key")
    assert_problem(problems, f"{path}: training.epochs", "greater than or equal to 0")


# ------------------------------------------------------------------ files and YAML

def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    assert info.value.where == str(path) and info.value.message == "file not found"


def test_invalid_yaml_names_line_and_column(tmp_path):
    text = ("name: t\n"
            "nodes:\n"
            "  - {name: client, endpoint: \"tcp://127.0.0.1:5701\"\n"
            "  party: clinic\n")
    path = write(tmp_path, text)
    problem = assert_problem(problems_of(path), f"{path}:4:3", "invalid YAML", "expected ',' or '}'")
    assert "Traceback" not in problem.message


def test_tab_indentation_names_the_line(tmp_path):
    path = write(tmp_path, "name: t\n\tnodes: []\n")
    assert_problem(problems_of(path), f"{path}:2:1", "invalid YAML", "'\\t'")


def test_duplicate_yaml_key_is_an_error(tmp_path):
    """PyYAML silently keeps the last of two equal keys; a second `training:` block must not vanish."""
    text = yaml.safe_dump(BASE, sort_keys=False) + "training: {batch_size: 32}\n"
    path = write(tmp_path, text)
    line = text.splitlines().index("training:") + 1
    assert_problem(problems_of(path), f"{path}:{len(text.splitlines())}:1", "invalid YAML",
                   f"duplicate key 'training' (first defined on line {line})")


def test_python_tags_are_refused(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system [echo hi]\n")
    assert_problem(problems_of(path), f"{path}:1:7", "invalid YAML", "could not determine a constructor")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_document_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    assert_problem(problems_of(path), str(path), "the topology must be a mapping")


def test_undecodable_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert_problem(problems_of(path), str(path), "cannot read file")


# ------------------------------------------------------------------ graph structure

def test_cycle(tmp_path, doc):
    doc["segments"][0]["inputs"] = ["pixels", "top"]
    doc["segments"][0]["merge"] = "concat"
    rejected(tmp_path, doc, "segments", "segments form a cycle: bottom -> top -> bottom")


def test_self_loop(tmp_path, doc):
    doc["segments"][1]["inputs"] = ["top"]
    rejected(tmp_path, doc, "segments", "segments form a cycle: top -> top")


def test_segment_on_unknown_node(tmp_path, doc):
    doc["segments"][1]["node"] = "cloud"
    rejected(tmp_path, doc, "segments[1](top).node", "is placed on unknown node 'cloud' (nodes: client, server)")


def test_data_on_unknown_node(tmp_path, doc):
    doc["data"][1]["node"] = "lab"
    rejected(tmp_path, doc, "data[1](digit_labels).node", "unknown node 'lab'")


def test_unknown_input(tmp_path, doc):
    doc["segments"][1]["inputs"] = ["botom"]
    rejected(tmp_path, doc, "segments[1](top).inputs[0]", "unknown input 'botom' (not a data source or segment)")


def test_task_is_not_an_input(tmp_path, doc):
    doc["segments"][1]["inputs"] = ["digit"]
    rejected(tmp_path, doc, "segments[1](top).inputs[0]", "unknown input 'digit'")


def test_input_listed_twice(tmp_path, doc):
    doc["segments"][1]["inputs"] = ["bottom", "bottom"]
    doc["segments"][1]["merge"] = "sum"
    rejected(tmp_path, doc, "segments[1](top).inputs[1]", "input 'bottom' is listed twice (also inputs[0])")


def test_unknown_task_output_and_labels(tmp_path, doc):
    doc["tasks"][0]["output"] = "head"
    doc["tasks"][0]["labels"] = "digits"
    path = write(tmp_path, doc)
    problems = problems_of(path)
    assert_problem(problems, f"{path}: tasks[0](digit).output", "output 'head' is not a segment")
    assert_problem(problems, f"{path}: tasks[0](digit).labels", "labels 'digits' is not a data source")


def test_segment_that_feeds_no_task(tmp_path, doc):
    doc["segments"].append({"name": "spare", "node": "client", "inputs": ["bottom"], "layers": [["Linear", 32, 4]]})
    rejected(tmp_path, doc, "segments[2](spare)", "feeds no task", kind=TopologyError)


def test_segment_needs_layers_or_factory(tmp_path, doc):
    doc["segments"][1]["factory"] = {"target": "torch.nn:Identity"}
    rejected(tmp_path, doc, "segments[1](top)", "exactly one of 'layers', 'factory' or 'llm'")


# ------------------------------------------------------------------ duplicates

def test_duplicate_endpoints(tmp_path, doc):
    doc["nodes"][1]["endpoint"] = "tcp://127.0.0.1:5701"
    rejected(tmp_path, doc, "nodes[1](server).endpoint",
             "endpoint tcp://127.0.0.1:5701 is used twice: by 'client' and by 'server'", kind=TopologyError)


def test_standby_reusing_an_endpoint(tmp_path, doc):
    doc["nodes"][1]["standby"] = ["tcp://127.0.0.1:5701"]
    rejected(tmp_path, doc, "nodes[1](server).standby[0]", "endpoint tcp://127.0.0.1:5701 is used twice",
             kind=TopologyError)


def test_replicated_endpoints_collide(tmp_path, doc):
    """Client copies take port + client index: 5701, 5702, 5703 runs into the server's 5702."""
    doc["clients"] = {"count": 3, "replicate": ["client"]}
    rejected(tmp_path, doc, "nodes[1](server).endpoint", "used twice: by 'client1' and by 'server'",
             "declared port + client index", kind=TopologyError)


def test_duplicate_node_names(tmp_path, doc):
    doc["nodes"][1]["name"] = "client"
    path = write(tmp_path, doc)
    problems = problems_of(path)
    # reported as such, not as the misleading "unknown node 'server'" placement errors that follow from it
    assert [p.where for p in problems] == [f"{path}: nodes[1](client).name"]
    assert_problem(problems, f"{path}: nodes[1](client).name", "duplicate node name 'client' (also nodes[0])")


def test_replica_names_clash_with_a_node(tmp_path, doc):
    doc["nodes"].append({"name": "client1", "endpoint": "tcp://127.0.0.1:5799", "party": "other"})
    doc["clients"] = {"count": 2, "replicate": ["client"]}
    rejected(tmp_path, doc, "clients.replicate", "node name 'client1' would be used twice",
             "copy of replicated node 'client'")


def test_replicate_unknown_node(tmp_path, doc):
    doc["clients"] = {"count": 2, "replicate": ["clinic"]}
    rejected(tmp_path, doc, "clients.replicate", "unknown node(s) 'clinic' (nodes: client, server)")


@pytest.mark.parametrize("section, index, clash", [
    ("segments", 1, "segment"), ("data", 1, "data source"), ("tasks", 0, "data source")])
def test_duplicate_names(tmp_path, doc, section, index, clash):
    doc[section][index]["name"] = {"segment": "bottom", "data source": "pixels"}[clash]
    name = doc[section][index]["name"]
    rejected(tmp_path, doc, f"{section}[{index}]({name}).name", f"name {name!r} is already used by a {clash}")


def test_duplicate_metrics_port(tmp_path, doc):
    doc["nodes"][0]["metrics_port"] = 9701
    doc["nodes"][1]["metrics_port"] = 9701
    rejected(tmp_path, doc, "nodes[1](server).metrics_port", "metrics_port 9701 is used by both 'client' and 'server'")


def test_duplicate_privacy_entries(tmp_path, doc):
    doc["privacy"] = [{"segment": "bottom", "nopeek": 0.1}, {"segment": "bottom", "nopeek": 0.5}]
    rejected(tmp_path, doc, "privacy[1].segment", "already has privacy settings (privacy[0])")


def test_privacy_for_unknown_segment(tmp_path, doc):
    doc["privacy"] = [{"segment": "bottm"}]
    rejected(tmp_path, doc, "privacy[0].segment", "unknown segment 'bottm'")


def test_unknown_and_replicated_coordinator(tmp_path, doc):
    doc["training"]["coordinator"] = "lab"
    rejected(tmp_path, doc, "training.coordinator", "unknown node 'lab' (nodes: client, server)")
    doc["training"]["coordinator"] = "client"
    doc["clients"] = {"count": 2, "replicate": ["client"]}
    doc["nodes"][1]["endpoint"] = "tcp://127.0.0.1:5709"
    rejected(tmp_path, doc, "training.coordinator", "replicated once per client")


# ------------------------------------------------------------------ privacy: labels and raw data

def test_labels_on_a_party_that_cannot_see_the_output(tmp_path, doc):
    doc["data"][1]["node"] = "client"  # labels at the clinic, the loss computed at the lab
    rejected(tmp_path, doc, "tasks[0](digit)", "labels 'digit_labels' are held by party 'clinic'",
             "output 'top' runs on party 'lab'", "labels or logits would cross a party boundary", kind=TopologyError)


def test_labels_on_another_node_of_the_same_party(tmp_path, doc):
    doc["nodes"].append({"name": "server2", "endpoint": "tcp://127.0.0.1:5703", "party": "lab"})
    doc["data"][1]["node"] = "server2"
    rejected(tmp_path, doc, "tasks[0](digit)", "labels 'digit_labels' must be on the node that computes output 'top'",
             kind=TopologyError)


def test_labels_used_as_a_segment_input(tmp_path, doc):
    doc["segments"][1]["inputs"] = ["bottom", "digit_labels"]
    rejected(tmp_path, doc, "segments[1](top).inputs[1]", "labels 'digit_labels' cannot be a segment input",
             kind=TopologyError)


def test_features_used_as_labels(tmp_path, doc):
    doc["data"][1]["kind"] = "features"
    rejected(tmp_path, doc, "tasks[0](digit).labels", "'digit_labels' holds features, not labels", kind=TopologyError)


def test_raw_data_crossing_a_party_boundary(tmp_path, doc):
    doc["data"].append({"name": "lab_pixels", "node": "client", "dataset": {"name": "digits"}})
    doc["segments"][1]["inputs"] = ["bottom", "lab_pixels"]
    doc["segments"][1]["layers"] = [["Linear", 96, 10]]
    rejected(tmp_path, doc, "segments[1](top).inputs[1]",
             "raw data 'lab_pixels' of party 'clinic' would cross to party 'lab'",
             "place segment 'top' on the node holding the data ('client')", kind=TopologyError)


def test_raw_data_read_from_another_node_of_the_same_party(tmp_path, doc):
    doc["nodes"].append({"name": "client_b", "endpoint": "tcp://127.0.0.1:5703", "party": "clinic"})
    doc["segments"][0]["node"] = "client_b"
    rejected(tmp_path, doc, "segments[0](bottom).inputs[0]", "data 'pixels' is held by node 'client'",
             "raw data never travels", kind=TopologyError)


@pytest.mark.parametrize("layers", [
    [["Flatten"]],
    [["ReLU"], ["Dropout", 0.5]],
    [["BatchNorm1d", 64]],  # element-wise affine: trainable, but invertible
    [["LayerNorm", 64], ["PReLU"]],
])
def test_no_trainable_layer_before_the_cut(tmp_path, doc, layers):
    doc["segments"][0]["layers"] = layers
    doc["segments"][1]["layers"] = [["Linear", 64, 10]]
    rejected(tmp_path, doc, "segments[0](bottom)", "has no trainable layer between raw data and the party boundary",
             "to 'top': raw data would leak", kind=TopologyError)


def test_no_trainable_layer_across_two_segments(tmp_path, doc):
    """Protection is counted along the path: Flatten then Identity on the client still leaks."""
    doc["segments"] = [
        {"name": "flat", "node": "client", "inputs": ["pixels"], "layers": [["Flatten"]]},
        {"name": "bottom", "node": "client", "inputs": ["flat"], "layers": [["Identity"]]},
        {"name": "top", "node": "server", "inputs": ["bottom"], "layers": [["Linear", 64, 10]]},
    ]
    rejected(tmp_path, doc, "segments[1](bottom)", "raw data would leak", kind=TopologyError)


def test_shallow_cut_is_a_warning(tmp_path, doc):
    doc["segments"][0]["layers"] = [["Linear", 64, 32], ["ReLU"]]
    topology = load_topology(write(tmp_path, doc))  # valid
    [warning] = topology.warnings
    assert warning.startswith(f"{tmp_path / 'topo.yaml'}: segments[0](bottom): shallow cut")
    assert "only one trainable layer" in warning and "'top'" in warning


def test_two_layers_before_the_cut_do_not_warn(tmp_path, doc):
    assert load_topology(write(tmp_path, doc)).warnings == []


# ------------------------------------------------------------------ layers, factories and shapes

def test_shape_mismatch_names_the_layer(tmp_path, doc):
    doc["segments"][0]["layers"] = [["Linear", 32, 32], ["ReLU"], ["Linear", 32, 32]]  # fed 64 pixels
    rejected(tmp_path, doc, "segments[0](bottom).layers[0]", "Linear(in_features=32",
             "cannot take input of shape (64,)", kind=TopologyError)


def test_shape_mismatch_deeper_in_the_list(tmp_path, doc):
    doc["segments"][1]["layers"] = [["Linear", 32, 16], ["ReLU"], ["Linear", 32, 10]]
    rejected(tmp_path, doc, "segments[1](top).layers[2]", "Linear(in_features=32", "input of shape (16,)",
             "segment input (32,)", kind=TopologyError)


def test_shape_mismatch_across_a_merge(tmp_path, doc):
    doc["segments"].insert(1, {"name": "side", "node": "client", "inputs": ["pixels"],
                               "layers": [["Linear", 64, 16], ["ReLU"], ["Linear", 16, 16]]})
    doc["segments"][2]["inputs"] = ["bottom", "side"]
    doc["segments"][2]["merge"] = "sum"
    rejected(tmp_path, doc, "segments[2](top).merge", "cannot sum inputs of shapes [(32,), (16,)]", kind=TopologyError)


def test_cross_entropy_output_size_must_match_classes(tmp_path, doc):
    doc["segments"][1]["layers"] = [["Linear", 32, 7]]
    rejected(tmp_path, doc, "tasks[0](digit)", "cross_entropy needs output shape (10,) for 10 classes, got (7,)",
             kind=TopologyError)


def test_bce_needs_one_logit_and_binary_labels(tmp_path, doc):
    doc["tasks"][0]["loss"] = "bce_with_logits"
    rejected(tmp_path, doc, "tasks[0](digit)", "bce_with_logits needs one logit per sample, got (10,)",
             kind=TopologyError)
    doc["segments"][1]["layers"] = [["Linear", 32, 1]]
    rejected(tmp_path, doc, "tasks[0](digit).loss", "bce_with_logits needs binary labels", "10 classes",
             kind=TopologyError)


def test_mse_needs_matching_sizes(tmp_path, doc):
    doc["tasks"][0]["loss"] = "mse"
    rejected(tmp_path, doc, "tasks[0](digit)", "mse compares output (10,)", "targets ()", kind=TopologyError)


def test_cross_entropy_needs_class_labels(tmp_path, doc):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((50, 64)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.random.default_rng(1).random(50).astype(np.float32))
    for entry in doc["data"]:
        entry["dataset"] = {"name": "numpy", "options": {"path": "x.npy", "labels": "y.npy"}}
    rejected(tmp_path, doc, "tasks[0](digit).loss", "cross_entropy needs class labels", "use loss: mse",
             kind=TopologyError)
    doc["tasks"][0]["loss"] = "mse"
    doc["segments"][1]["layers"] = [["Linear", 32, 1]]
    load_topology(write(tmp_path, doc))  # a regression head is fine


def test_unknown_layer_type(tmp_path, doc):
    doc["segments"][1]["layers"] = [["Linear", 32, 16], ["Relu"], ["Linear", 16, 10]]
    rejected(tmp_path, doc, "segments[1](top).layers[1]", "unknown layer type 'Relu'")


def test_bad_layer_arguments(tmp_path, doc):
    doc["segments"][1]["layers"] = [["Linear", 32]]
    rejected(tmp_path, doc, "segments[1](top).layers[0]", "cannot build Linear", "out_features")


def test_layer_that_is_not_a_list(tmp_path, doc):
    doc["segments"][1]["layers"] = [["Linear", 32, 10], "ReLU"]
    rejected(tmp_path, doc, "segments[1](top).layers[1]", "valid list")


def test_empty_layer_list(tmp_path, doc):
    doc["segments"][1]["layers"] = []
    rejected(tmp_path, doc, "segments[1](top).layers", "a segment needs at least one layer")


def test_factory_import_failure(tmp_path, doc):
    doc["segments"][1].pop("layers")
    doc["segments"][1]["factory"] = {"target": "no_such_package_xyz.models:head"}
    rejected(tmp_path, doc, "segments[1](top).factory.target", "cannot import module 'no_such_package_xyz.models'")


def test_factory_that_is_not_callable(tmp_path, doc):
    doc["segments"][1].pop("layers")
    doc["segments"][1]["factory"] = {"target": "torch.nn:NoSuchModule"}
    rejected(tmp_path, doc, "segments[1](top).factory.target", "'torch.nn:NoSuchModule' is not a callable")


def test_factory_that_raises(tmp_path, doc):
    doc["segments"][1].pop("layers")
    doc["segments"][1]["factory"] = {"target": "torch.nn:Linear", "kwargs": {"in_features": 32, "width": 3}}
    rejected(tmp_path, doc, "segments[1](top).factory", "factory torch.nn:Linear failed", "width")


def test_factory_target_syntax(tmp_path, doc):
    doc["segments"][1].pop("layers")
    doc["segments"][1]["factory"] = {"target": "torch.nn.Linear"}
    rejected(tmp_path, doc, "segments[1](top).factory.target", "should match pattern")


def test_factory_that_works(tmp_path, doc):
    doc["segments"][1].pop("layers")
    doc["segments"][1]["factory"] = {"target": "torch.nn:Linear", "kwargs": {"in_features": 32, "out_features": 10}}
    topology = load_topology(write(tmp_path, doc))
    assert topology.segment_info["top"].parameters == 32 * 10 + 10


# ------------------------------------------------------------------ data sources

def test_unknown_dataset(tmp_path, doc):
    doc["data"][0]["dataset"]["name"] = "mnist"
    rejected(tmp_path, doc, "data[0](pixels).dataset", "unknown dataset 'mnist'", "digits", kind=DataError)


def test_unknown_dataset_option(tmp_path, doc):
    doc["data"][0]["dataset"]["options"] = {"colour": True}
    rejected(tmp_path, doc, "data[0](pixels).dataset.options", "unknown option 'colour'", kind=DataError)


def test_bad_dataset_option_value_names_the_option(tmp_path, doc):
    doc["data"][0]["dataset"] = {"name": "synthetic", "options": {"shape": "wide"}}
    rejected(tmp_path, doc, "data[0](pixels).dataset.options.shape", "option 'shape' must be a list",
             kind=DataError)


def test_missing_data_file(tmp_path, doc):
    doc["data"][0]["dataset"] = {"name": "csv", "options": {"path": "pixels.csv"}}
    rejected(tmp_path, doc, "data[0](pixels).dataset.options.path", f"file not found: {tmp_path / 'pixels.csv'}",
             kind=DataError)


def test_factory_dataset_import_failure(tmp_path, doc):
    doc["data"][1]["dataset"] = {"name": "factory", "options": {"target": "no_such_mod_xyz:labels"}}
    rejected(tmp_path, doc, "data[1](digit_labels).dataset.options.target", "cannot import 'no_such_mod_xyz:labels'",
             kind=DataError)


def test_column_selection_out_of_range(tmp_path, doc):
    doc["data"][0]["columns"] = [0, 99]
    rejected(tmp_path, doc, "data[0](pixels).columns", "column 99 is out of range; features have 64 columns",
             kind=DataError)


def test_labels_from_a_dataset_without_labels(tmp_path, doc):
    np.save(tmp_path / "x.npy", np.zeros((1797, 64), dtype=np.float32))
    doc["data"][1]["dataset"] = {"name": "numpy", "options": {"path": "x.npy"}}
    rejected(tmp_path, doc, "data[1](digit_labels).dataset", "dataset has no labels", kind=DataError)


def test_row_count_mismatch_across_sources(tmp_path, doc):
    doc["data"][0]["dataset"] = {"name": "synthetic", "options": {"shape": [64], "num_samples": 100}}
    rejected(tmp_path, doc, "data", "different row counts", "'pixels': 100", "'digit_labels': 1797",
             "aligned by row index", kind=DataError)


def test_config_errors_are_value_errors_with_where(tmp_path, doc):
    """ConfigErrors aggregates: each problem keeps its own `where`; str() lists them one per line."""
    doc["nodes"][0]["x"] = 1
    doc["nodes"][1]["y"] = 2
    with pytest.raises(ConfigErrors) as info:
        load_spec(write(tmp_path, doc))
    assert isinstance(info.value, ValueError)
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]
    assert [p.where.split(": ", 1)[1] for p in info.value.problems] == ["nodes[0](client).x", "nodes[1](server).y"]


def test_non_string_keys(tmp_path, doc):
    doc["nodes"][0][1] = "one"
    rejected(tmp_path, doc, "nodes[0](client).1", "Keys should be strings")
