"""The Arrow readers (csv, parquet, arrow/feather, numpy): the same table from every format, column
projection, float32 without a float64 copy, memory maps, and errors that name file, line and column."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from meshsl.config.specs import DatasetSpec
from meshsl.data import Selection, clear_dataset_cache, dataset_rows, load_dataset
from meshsl.errors import DataError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def table_files(folder: Path, rows: int = 300, width: int = 7) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One table (ids, feature columns, a text label) written as CSV, Parquet, Feather and .npy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    labels = np.array(["yes", "no"])[rng.integers(0, 2, rows)]
    ids = [f"id-{i:04d}" for i in range(rows)]
    columns = {"sample": ids, **{f"c{j}": x[:, j] for j in range(width)}, "outcome": labels.tolist()}
    table = pa.table(columns)
    pa_csv.write_csv(table, folder / "t.csv")
    pq.write_table(table, folder / "t.parquet", row_group_size=64)
    feather.write_feather(table, folder / "t.feather")
    np.save(folder / "t.npy", x)
    return x, (labels == "yes").astype(np.int64), ids


def load(name: str, folder: Path, select: Selection = Selection(), **options):
    return load_dataset(DatasetSpec(name=name, options=options), folder, select)


@pytest.mark.parametrize("fmt, suffix", [("csv", "csv"), ("parquet", "parquet"), ("arrow", "feather")])
def test_every_format_reads_the_same_float32_table_ids_and_labels(tmp_path, fmt, suffix):
    x, y, ids = table_files(tmp_path)
    table = load(fmt, tmp_path, path=f"t.{suffix}", label_column="outcome", id_column="sample")
    assert table.features.dtype == np.float32 and table.features.flags.c_contiguous
    assert np.array_equal(table.features, x)
    assert table.feature_names == tuple(f"c{j}" for j in range(7))
    assert table.labels.tolist() == y.tolist() and table.num_classes == 2  # "no" < "yes": sorted class ids
    assert table.ids == tuple(ids)
    assert dataset_rows(DatasetSpec(name=fmt, options={"path": f"t.{suffix}"}), tmp_path) == len(x)


@pytest.mark.parametrize("fmt, suffix", [("csv", "csv"), ("parquet", "parquet"), ("arrow", "feather")])
def test_only_the_selected_columns_and_rows_are_read(tmp_path, fmt, suffix):
    x, y, _ = table_files(tmp_path)
    options = {"path": f"t.{suffix}", "label_column": "outcome", "id_column": "sample"}
    picked = load(fmt, tmp_path, Selection(columns=["c5", 1]), **options)
    assert picked.feature_names == ("c5", "c1") and np.array_equal(picked.features, x[:, [5, 1]])
    sliced = load(fmt, tmp_path, Selection(columns="2:4"), **options)
    assert np.array_equal(sliced.features, x[:, 2:4])
    labels_only = load(fmt, tmp_path, Selection(features=False), **options)
    assert labels_only.features.shape == (len(x), 0) and labels_only.labels.tolist() == y.tolist()
    head = load(fmt, tmp_path, Selection(head=3), **options)
    assert np.array_equal(head.features, x[:3])


def test_npy_stays_memory_mapped_and_column_subsets_are_copied(tmp_path):
    x, _, _ = table_files(tmp_path)
    mapped = load("numpy", tmp_path, path="t.npy")
    assert isinstance(mapped.features.base, np.memmap) or isinstance(mapped.features, np.memmap)
    assert np.array_equal(mapped.features, x)
    in_memory = load("numpy", tmp_path, path="t.npy", mmap=False)
    assert not isinstance(in_memory.features, np.memmap) and np.array_equal(in_memory.features, x)
    subset = load("numpy", tmp_path, Selection(columns=[0, 3]), path="t.npy")
    assert not isinstance(subset.features, np.memmap) and np.array_equal(subset.features, x[:, [0, 3]])


def test_an_arrow_tensor_column_is_a_view_of_the_memory_map(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    flat = pa.array(x.reshape(-1))
    batch = pa.record_batch([pa.FixedSizeListArray.from_arrays(flat, 4), pa.array(np.arange(10) % 2)],
                            names=["features", "label"])
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    table = load("arrow", tmp_path, path="t.arrow", label_column="label")
    assert np.array_equal(table.features, x) and not table.features.flags.writeable  # the map, read-only
    assert table.labels.tolist() == [0, 1] * 5


def test_csv_errors_name_file_line_and_column(tmp_path):
    (tmp_path / "text.csv").write_text("a,b\n1,2\n3,abc\n")
    with pytest.raises(DataError, match=r"text.csv:3 column 'b': 'abc' is not a number"):
        load("csv", tmp_path, path="text.csv")
    (tmp_path / "short.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(DataError, match=r"short.csv:3 has 1 fields, the header has 2"):
        load("csv", tmp_path, path="short.csv")
    (tmp_path / "empty.csv").write_text("a,b\n1,2\n3,\n")
    with pytest.raises(DataError, match=r"empty.csv: line 3, column 'b': an empty or missing value .*impute"):
        load("csv", tmp_path, path="empty.csv")
    kept = load("csv", tmp_path, Selection(allow_missing=True), path="empty.csv")
    assert np.isnan(kept.features[1, 1]) and kept.features[1, 0] == 3
    (tmp_path / "inf.csv").write_text("a,b\n1,2\n3,inf\n")
    with pytest.raises(DataError, match=r"inf.csv: line 3, column 'b': inf"):
        load("csv", tmp_path, Selection(allow_missing=True), path="inf.csv")  # imputing does not hide infinities


def test_parquet_nulls_and_non_numeric_columns_are_named(tmp_path):
    pq.write_table(pa.table({"a": [1.0, None, 3.0], "b": ["x", "y", "z"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: row 2, column 'a': an empty or missing value"):
        load("parquet", tmp_path, Selection(columns=["a"]), path="t.parquet")
    with pytest.raises(DataError, match=r"column 'b' holds string, not numbers"):
        load("parquet", tmp_path, path="t.parquet")


def test_a_csv_with_a_byte_order_mark_reads_its_id_column(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark (issue 26): the first header name is still `MRN`."""
    (tmp_path / "excel.csv").write_bytes("\ufeffMRN,a\nP1,1\nP2,2\n".encode("utf-8"))
    table = load("csv", tmp_path, path="excel.csv", id_column="MRN")
    assert table.ids == ("P1", "P2") and table.features.tolist() == [[1.0], [2.0]]


def test_csv_row_count_skips_blank_lines_and_a_missing_final_newline(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2\n\n3,4\n5,6")
    assert dataset_rows(DatasetSpec(name="csv", options={"path": "t.csv"}), tmp_path) == 3
    assert len(load("csv", tmp_path, path="t.csv").features) == 3


PEAK = """
import json, sys
from meshsl.config.specs import DatasetSpec
from meshsl.data import Selection, load_dataset
from meshsl.data import arrow_files
import torch
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
before = hwm()
t = load_dataset(DatasetSpec(name=sys.argv[1], options={"path": sys.argv[2]}), "/", Selection())
print(json.dumps({"grew": hwm() - before, "matrix": t.features.nbytes, "dtype": str(t.features.dtype)}))
"""


@pytest.mark.parametrize("fmt, suffix", [("parquet", "parquet"), ("csv", "csv")])
def test_peak_memory_stays_near_the_float32_matrix(tmp_path, fmt, suffix):
    """A 200,000 x 200 table (153 MiB as float32): the reader never holds a float64 copy or the whole
    Arrow table beside the matrix."""
    rng = np.random.default_rng(1)
    table = pa.table({f"c{j}": rng.standard_normal(200_000, dtype=np.float32) for j in range(200)})
    (pq.write_table(table, tmp_path / "t.parquet", row_group_size=65_536) if fmt == "parquet"
     else pa_csv.write_csv(table, tmp_path / "t.csv"))
    out = subprocess.run([sys.executable, "-c", PEAK, fmt, str(tmp_path / f"t.{suffix}")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["dtype"] == "float32" and result["matrix"] == 200_000 * 200 * 4
    assert result["grew"] <= 1.3 * result["matrix"] + 2**30, result  # the bound of issue 25
    # and no float64 copy or whole Arrow table beside the matrix (either would add >= 153 MiB more)
    assert result["grew"] - result["matrix"] <= 200 * 2**20, result


def test_csv_read_in_many_ranges_equals_one_and_a_quoted_line_break_falls_back(tmp_path, monkeypatch):
    """The CSV reader parses byte ranges ending at line breaks; ranges of a few bytes give the same table,
    and a range boundary inside a quoted field (a line break in an id) falls back to the streaming reader."""
    from meshsl.data import arrow_files
    x, y, ids = table_files(tmp_path, rows=50)
    whole = load("csv", tmp_path, path="t.csv", label_column="outcome", id_column="sample")
    monkeypatch.setattr(arrow_files, "CSV_RANGE_BYTES", 7)
    assert len(arrow_files._csv_ranges(tmp_path / "t.csv")) > 40
    clear_dataset_cache()
    split = load("csv", tmp_path, path="t.csv", label_column="outcome", id_column="sample")
    assert np.array_equal(split.features, whole.features) and split.ids == whole.ids
    assert split.labels.tolist() == whole.labels.tolist()
    (tmp_path / "quoted.csv").write_text('id,a\n"first\nline",1\n"p2",2\n"x\ny\nz",3\n')
    monkeypatch.setattr(arrow_files, "CSV_RANGE_BYTES", 2)  # the first range ends inside '"first\nline"'
    streamed = []
    stream = arrow_files.pa_csv.open_csv
    monkeypatch.setattr(arrow_files.pa_csv, "open_csv", lambda *a, **k: streamed.append(1) or stream(*a, **k))
    table = load("csv", tmp_path, path="quoted.csv", id_column="id")
    assert streamed == [1]  # the fallback read it
    assert table.ids == ("first\nline", "p2", "x\ny\nz") and table.features.tolist() == [[1.0], [2.0], [3.0]]
