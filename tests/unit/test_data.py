"""meshsl.data: loaders, column selection, split, partitions, sampler."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshsl.data import (
    DatasetSpec,
    PartitionSpec,
    Table,
    batch_indices,
    eval_batches,
    label_counts,
    load_dataset,
    partition,
    select_columns,
    selected_shape,
    steps_per_epoch,
    train_test_indices,
)
from meshsl.errors import DataError


FACTORY_MODULE = """
import numpy as np

def make_data(rows=10, cols=3):
    return np.arange(rows * cols, dtype=np.float64).reshape(rows, cols), np.arange(rows) % 2

def make_garbage():
    return "not arrays"

def make_crash():
    raise RuntimeError("disk on fire")
"""


def load(name: str, base_dir=".", **options) -> Table:
    return load_dataset(DatasetSpec(name=name, options=options), base_dir)


# ---------------------------------------------------------------- loaders

def test_digits_flat_and_image():
    flat = load("digits")
    assert flat.features.shape == (1797, 64) and flat.features.dtype == np.float32
    assert flat.labels.dtype == np.int64 and flat.labels.shape == (1797,) and flat.num_classes == 10
    assert 0.0 <= flat.features.min() and flat.features.max() <= 1.0
    assert len(flat.feature_names) == 64
    image = load("digits", image=True)
    assert image.feature_shape == (1, 8, 8)
    np.testing.assert_array_equal(image.features.reshape(1797, 64), flat.features)


def test_breast_cancer_standardised():
    table = load("breast_cancer")
    assert table.features.shape == (569, 30) and table.features.dtype == np.float32
    assert table.num_classes == 2 and "mean radius" in table.feature_names
    np.testing.assert_allclose(table.features.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(table.features.std(axis=0), 1.0, atol=1e-3)


def test_synthetic_any_shape_deterministic_and_learnable():
    table = load("synthetic", shape=[3, 8, 8], num_samples=512, num_classes=4, seed=1)
    assert table.features.shape == (512, 3, 8, 8) and table.features.dtype == np.float32
    assert table.labels.shape == (512,) and table.num_classes == 4 and table.feature_names == ()
    assert len(np.unique(table.labels)) == 4
    again = load("synthetic", shape=[3, 8, 8], num_samples=512, num_classes=4, seed=1, base_dir="/")
    np.testing.assert_array_equal(table.features, again.features)
    other = load("synthetic", shape=[3, 8, 8], num_samples=512, num_classes=4, seed=2)
    assert not np.array_equal(table.labels, other.labels)
    # labels come from a linear teacher, so a least-squares linear probe beats chance by far
    x = table.features.reshape(512, -1)
    w, *_ = np.linalg.lstsq(x, np.eye(4)[table.labels], rcond=None)
    assert (np.argmax(x @ w, axis=1) == table.labels).mean() > 0.8


def test_load_is_cached():
    assert load("digits") is load("digits")


def test_csv_with_header_and_text_labels(tmp_path):
    (tmp_path / "data.csv").write_text("a,b,y,c\n1,2,cat,3\n4,5,dog,6\n7,8,cat,9\n")
    table = load("csv", base_dir=tmp_path, path="data.csv", label_column="y")
    assert table.feature_names == ("a", "b", "c")
    np.testing.assert_array_equal(table.features, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert table.features.dtype == np.float32
    np.testing.assert_array_equal(table.labels, [0, 1, 0])
    assert table.num_classes == 2


def test_csv_numeric_labels_and_no_labels(tmp_path):
    (tmp_path / "d.csv").write_text("x1,x2,label\n0.5,1,2\n1.5,2,0\n")
    table = load("csv", base_dir=tmp_path, path="d.csv", label_column="label")
    np.testing.assert_array_equal(table.labels, [2, 0])
    assert table.labels.dtype == np.int64 and table.num_classes == 3
    plain = load("csv", base_dir=tmp_path, path="d.csv")
    assert plain.labels is None and plain.features.shape == (2, 3)


def test_csv_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n")
    with pytest.raises(DataError, match="'b'.*not a number"):
        load("csv", base_dir=tmp_path, path="bad.csv")
    (tmp_path / "ok.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="label_column 'y'"):
        load("csv", base_dir=tmp_path, path="ok.csv", label_column="y")


def test_numpy_npy_and_npz(tmp_path):
    x = np.random.default_rng(0).random((20, 5))
    y = np.arange(20) % 3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    table = load("numpy", base_dir=tmp_path, path="x.npy", labels="y.npy")
    assert table.features.shape == (20, 5) and table.features.dtype == np.float32
    np.testing.assert_array_equal(table.labels, y)
    assert table.num_classes == 3
    np.savez(tmp_path / "d.npz", x=x.reshape(20, 1, 5), y=y)
    packed = load("numpy", base_dir=tmp_path, path="d.npz", labels_key="y")
    assert packed.feature_shape == (1, 5) and packed.labels.dtype == np.int64


def test_numpy_refuses_pickles(tmp_path):
    objects = np.array([{"evil": 1}, None], dtype=object)
    np.save(tmp_path / "obj.npy", objects, allow_pickle=True)
    with pytest.raises(DataError, match="pickled"):
        load("numpy", base_dir=tmp_path, path="obj.npy")
    np.savez(tmp_path / "obj.npz", x=objects)
    with pytest.raises(DataError, match="pickled"):
        load("numpy", base_dir=tmp_path, path="obj.npz")


def test_label_count_mismatch(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 2)))
    np.save(tmp_path / "y.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="3 labels for 4") as info:
        load("numpy", base_dir=tmp_path, path="x.npy", labels="y.npy")
    assert info.value.where == "dataset 'numpy'"


def test_factory_tuple_and_errors(tmp_path, monkeypatch):
    (tmp_path / "meshsl_test_factory.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    table = load("factory", target="meshsl_test_factory:make_data", kwargs={"rows": 6, "cols": 4})
    assert table.features.shape == (6, 4) and table.num_classes == 2
    with pytest.raises(DataError, match="cannot import"):
        load("factory", target="meshsl_test_factory:no_such_function")
    with pytest.raises(DataError, match="cannot import"):
        load("factory", target="no_such_module_xyz:f")
    with pytest.raises(DataError, match=r"\(features, labels\)"):
        load("factory", target="meshsl_test_factory:make_garbage")
    with pytest.raises(DataError, match="RuntimeError: disk on fire"):
        load("factory", target="meshsl_test_factory:make_crash")


def test_unknown_dataset_option_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'.*digits"):
        load("mnist")
    with pytest.raises(DataError, match="unknown option 'colour'") as info:
        load("digits", colour=True)
    assert info.value.where == "dataset 'digits'.options"
    with pytest.raises(DataError, match="missing required option.*path"):
        load("csv")
    with pytest.raises(DataError, match="file not found: .*nope.csv"):
        load("csv", base_dir=tmp_path, path="nope.csv")


def test_spec_rejects_unknown_keys_and_bad_fraction():
    with pytest.raises(ValueError):
        DatasetSpec(name="digits", shuffle=True)
    with pytest.raises(ValueError):
        DatasetSpec(name="digits", test_fraction=1.0)
    with pytest.raises(ValueError):
        PartitionSpec(kind="dirichlet", alpha=0)


# ---------------------------------------------------------------- columns

def test_select_columns_forms():
    table = load("breast_cancer")
    assert select_columns(table, "all") is table.features
    np.testing.assert_array_equal(select_columns(table, [0, 2]), table.features[:, [0, 2]])
    np.testing.assert_array_equal(select_columns(table, "10:15"), table.features[:, 10:15])
    np.testing.assert_array_equal(select_columns(table, "25:"), table.features[:, 25:])
    named = select_columns(table, ["mean radius", "worst area"])
    np.testing.assert_array_equal(named, table.features[:, [0, table.feature_names.index("worst area")]])
    assert selected_shape(table, "10:15") == (5,) and selected_shape(table, "all") == (30,)
    assert selected_shape(table, ["mean radius", 3]) == (2,)


@pytest.mark.parametrize("columns, message", [
    ([30], "out of range"), (["nope"], "unknown column 'nope'"), ("5:5", "selects no columns"),
    ("a:b", "not a slice"), ([], "non-empty list"), ([1, 1], "twice"),
])
def test_select_columns_errors(columns, message):
    with pytest.raises(DataError, match=message):
        select_columns(load("breast_cancer"), columns)


def test_select_columns_on_images_only_all():
    table = load("digits", image=True)
    assert selected_shape(table, "all") == (1, 8, 8)
    with pytest.raises(DataError, match="only 'all'"):
        select_columns(table, "0:4")


# ---------------------------------------------------------------- split

def test_train_test_split_deterministic_disjoint_covering():
    train, test = train_test_indices(100, 0.2, seed=7)
    assert len(test) == 20 and len(train) == 80
    assert train.dtype == np.int64 and np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(100))
    again = train_test_indices(100, 0.2, seed=7)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(train_test_indices(100, 0.2, seed=8)[1], test)
    train, test = train_test_indices(10, 0.0, seed=0)
    assert len(train) == 10 and len(test) == 0


# ---------------------------------------------------------------- partitions

def assert_disjoint_cover(shards, indices):
    joined = np.concatenate(shards)
    assert len(joined) == len(indices) and len(np.unique(joined)) == len(joined)
    np.testing.assert_array_equal(np.sort(joined), np.sort(indices))
    for shard in shards:
        assert shard.dtype == np.int64 and np.all(np.diff(shard) > 0)


def mean_label_entropy(shards, labels, num_classes):
    counts = label_counts(shards, labels, num_classes).astype(float)
    p = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(-(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "label_skew"])
def test_partition_disjoint_covering_deterministic(kind):
    table = load("digits")
    train, _ = train_test_indices(len(table.labels), 0.2, seed=0)
    spec = PartitionSpec(kind=kind, alpha=0.3, classes_per_client=2, min_samples=20)
    shards = partition(train, table.labels, 8, spec, seed=3)
    assert len(shards) == 8
    assert_disjoint_cover(shards, train)
    assert min(len(s) for s in shards) >= 20
    again = partition(train, table.labels, 8, spec, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


def test_dirichlet_small_alpha_more_skewed_than_iid():
    table = load("digits")
    idx = np.arange(len(table.labels))
    iid = partition(idx, table.labels, 10, PartitionSpec(kind="iid"), seed=0)
    skewed = partition(idx, table.labels, 10, PartitionSpec(kind="dirichlet", alpha=0.1), seed=0)
    assert mean_label_entropy(skewed, table.labels, 10) < mean_label_entropy(iid, table.labels, 10) - 0.5


def test_label_skew_gives_k_classes_per_client():
    table = load("digits")
    idx = np.arange(len(table.labels))
    shards = partition(idx, table.labels, 5, PartitionSpec(kind="label_skew", classes_per_client=2), seed=1)
    assert all(len(np.unique(table.labels[s])) == 2 for s in shards)
    with pytest.raises(DataError, match="cannot cover all 10 classes"):
        partition(idx, table.labels, 4, PartitionSpec(kind="label_skew", classes_per_client=2), seed=1)


def test_min_samples_repaired_and_impossible():
    labels = np.array([0] * 95 + [1] * 5)
    idx = np.arange(100)
    spec = PartitionSpec(kind="dirichlet", alpha=0.01, min_samples=15)
    shards = partition(idx, labels, 6, spec, seed=0)
    assert_disjoint_cover(shards, idx)
    assert min(len(s) for s in shards) >= 15
    with pytest.raises(DataError, match="min_samples"):
        partition(idx, labels, 7, spec, seed=0)


def test_non_iid_needs_labels():
    with pytest.raises(DataError, match="need labels"):
        partition(np.arange(50), None, 2, PartitionSpec(kind="dirichlet"), seed=0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), clients=st.integers(1, 12), classes=st.integers(1, 6),
       kind=st.sampled_from(["iid", "dirichlet", "label_skew"]), min_samples=st.integers(1, 10),
       seed=st.integers(0, 2**32 - 1))
def test_partition_property(n, clients, classes, kind, min_samples, seed):
    labels = np.random.default_rng(seed).integers(0, classes, size=n + 7)
    indices = np.random.default_rng(seed + 1).choice(n + 7, size=n, replace=False)
    spec = PartitionSpec(kind=kind, alpha=0.2, classes_per_client=1, min_samples=min_samples)
    try:
        shards = partition(indices, labels, clients, spec, seed)
    except DataError:
        present = len(np.unique(labels[indices]))
        assert n < clients * min_samples or (kind == "label_skew" and clients < present)
        return
    assert len(shards) == clients
    assert_disjoint_cover(shards, indices)
    assert min(len(s) for s in shards) >= min_samples


# ---------------------------------------------------------------- sampler

def test_sampler_deterministic_full_batches_and_covering():
    pool = np.arange(100, 203)  # 103 rows: the last batch wraps around
    steps = steps_per_epoch(len(pool), 10)
    assert steps == 11
    batches = [batch_indices(pool, 10, seed=5, epoch=2, step=s) for s in range(steps)]
    assert all(len(b) == 10 and b.dtype == np.int64 for b in batches)
    assert set(np.concatenate(batches)) == set(pool)
    assert len(np.unique(np.concatenate(batches[:10]))) == 100  # no repeats before the wrap
    np.testing.assert_array_equal(batch_indices(pool, 10, seed=5, epoch=2, step=3), batches[3])
    assert not np.array_equal(batch_indices(pool, 10, seed=5, epoch=3, step=3), batches[3])
    assert not np.array_equal(batch_indices(pool, 10, seed=5, epoch=2, step=3, lane=1), batches[3])


def test_sampler_batch_larger_than_pool():
    pool = np.array([4, 8, 15])
    batch = batch_indices(pool, 8, seed=0, epoch=0, step=0)
    assert len(batch) == 8 and set(batch) == {4, 8, 15}
    assert steps_per_epoch(3, 8) == 1


def test_sampler_errors_and_eval_batches():
    with pytest.raises(DataError):
        batch_indices(np.array([], dtype=np.int64), 4, 0, 0, 0)
    with pytest.raises(DataError):
        steps_per_epoch(10, 0)
    batches = eval_batches(np.arange(10), 4)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
