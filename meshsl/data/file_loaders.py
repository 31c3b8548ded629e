"""The `csv`, `parquet`, `arrow` (Feather) and `numpy` datasets: a party's own files, read with Apache Arrow.

Each takes a `Selection` (meshsl.data.selection) and converts only the columns and rows it names.
NumPy files are read with `allow_pickle=False` (a pickle can run code) and memory-mapped by default.
"""
from __future__ import annotations

import mmap as mmap_module
from pathlib import Path
from typing import Any, Optional

import numpy as np

from meshsl.data.matrix import mapped_selection
from meshsl.data.registry import Table, normalise_labels, register_dataset, register_row_count, resolve_path
from meshsl.data.selection import Selection, resolve_columns
from meshsl.errors import DataError

# pyarrow (meshsl.data.arrow_files) is imported by the readers that need it, not here: importing it costs
# every node process a few hundred milliseconds, and nodes of scikit-learn or generated datasets never use it.

ALL = Selection()


def _table(read, where: str) -> Table:
    labels, classes = (None, None) if read.labels is None else normalise_labels(read.labels, where)
    ids = None if read.ids is None else tuple(read.ids)
    return Table(features=read.features, labels=labels, num_classes=classes, feature_names=read.feature_names,
                 ids=ids)


@register_dataset("csv")
def _load_csv(base_dir: Path, *, path: str, label_column: Optional[str] = None, delimiter: str = ",",
              id_column: Optional[str] = None, select: Selection = ALL) -> Table:
    """A CSV file with a header row (a UTF-8 byte-order mark is fine). Arrow's multi-threaded reader
    converts only the selected feature columns, straight to float32; ids stay exact strings."""
    where = "dataset 'csv'"
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise DataError(f"option 'delimiter' must be one character, got {delimiter!r}", f"{where}.options.delimiter")
    file = resolve_path(base_dir, path, f"{where}.options.path")
    read = _arrow().read_csv(file, select, delimiter=delimiter, label_column=label_column, id_column=id_column, where=where)
    return _table(read, where)


@register_dataset("parquet")
def _load_parquet(base_dir: Path, *, path: str, label_column: Optional[str] = None, id_column: Optional[str] = None,
                  select: Selection = ALL) -> Table:
    """A Parquet file: only the selected columns are read (column projection), a row group at a time."""
    where = "dataset 'parquet'"
    file = resolve_path(base_dir, path, f"{where}.options.path")
    return _table(_arrow().read_parquet(file, select, label_column=label_column, id_column=id_column, where=where), where)


@register_dataset("arrow")
def _load_arrow(base_dir: Path, *, path: str, label_column: Optional[str] = None, id_column: Optional[str] = None,
                features_column: Optional[str] = None, select: Selection = ALL) -> Table:
    """An Arrow IPC file (Feather v2), memory-mapped. Features are numeric columns, or one
    fixed_size_list<float32> column (`features_column`, found by itself when it is the only list column),
    which stays memory-mapped: a table larger than memory trains, reading only each micro-batch's rows."""
    where = "dataset 'arrow'"
    file = resolve_path(base_dir, path, f"{where}.options.path")
    read = _arrow().read_ipc(file, select, label_column=label_column, id_column=id_column, features_column=features_column,
                    where=where)
    return _table(read, where)


register_dataset("feather")(_load_arrow)


@register_dataset("numpy")
def _load_numpy(base_dir: Path, *, path: str, labels: Optional[str] = None, features_key: str = "x",
                labels_key: Optional[str] = None, mmap: bool = True, select: Selection = ALL) -> Table:
    """Features from a .npy file (labels from another .npy) or from keys of one .npz archive. A float32
    .npy in C order stays memory-mapped (`mmap: false` reads it into memory)."""
    where = "dataset 'numpy'"
    file = resolve_path(base_dir, path, f"{where}.options.path")
    if file.suffix == ".npz":
        with _np_load(file, where) as archive:
            x = _npz_member(archive, features_key, file, where)
            y = None if labels_key is None else _npz_member(archive, labels_key, file, where)
    else:
        if labels_key is not None:
            raise DataError("labels_key only applies to .npz archives; use 'labels: file.npy'", f"{where}.options")
        x = _np_load(file, where, mmap=bool(mmap))
        y = None
    if labels is not None:
        if y is not None:
            raise DataError("give labels either as 'labels' (a file) or 'labels_key', not both", f"{where}.options")
        y = _np_load(resolve_path(base_dir, labels, f"{where}.options.labels"), where)
    if not isinstance(x, np.ndarray) or (y is not None and not isinstance(y, np.ndarray)):
        raise DataError("expected .npy arrays (a .npz archive needs features_key)", where)
    return _numpy_table(x, y, select, file, where)


def _numpy_table(x: np.ndarray, y: Optional[np.ndarray], select: Selection, file: Path, where: str) -> Table:
    if x.dtype.kind not in "biuf":
        raise DataError(f"features must be numeric, got dtype {x.dtype}", where)
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"features must have shape [N, ...] with N >= 1 and at least 2 dims, got {x.shape}", where)
    labels, classes = (None, None) if y is None else normalise_labels(y[:select.head] if select.head else y, where)
    names = tuple(f"f{i}" for i in range(x.shape[1])) if x.ndim == 2 else ()
    if not select.features:
        features = np.empty((len(x) if select.head is None else min(len(x), select.head), 0), np.float32)
        return Table(features, labels, classes, (), None)
    if x.ndim != 2:
        if select.columns != "all":
            raise DataError(f"only 'all' can select from features of shape {x.shape[1:]}", "columns")
        flat = _float32_c(x.reshape(len(x), -1))
        chosen = list(range(flat.shape[1]))
        features = mapped_selection(flat, chosen, select, file)[0].reshape(-1, *x.shape[1:])
    else:
        chosen = resolve_columns(names, select.columns)
        features = mapped_selection(_float32_c(x), chosen, select, file)[0]
        names = tuple(names[i] for i in chosen)
    if labels is not None and len(labels) != len(features):
        raise DataError(f"{len(labels)} labels for {len(features)} feature rows", where)
    return Table(features, labels, classes, names, None)


def _float32_c(x: np.ndarray) -> np.ndarray:
    """x as float32 in C order: a memory map of the right kind is kept; anything else is converted in blocks."""
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), 65_536):
        out[start:start + 65_536] = x[start:start + 65_536]
    return out


def _np_load(file: Path, where: str, mmap: bool = False) -> Any:
    try:  # never unpickle: a pickle can run arbitrary code
        array = np.load(file, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot load {file} (pickled/object arrays are refused): {exc}", where) from None
    _random_access(array)
    return array


def _random_access(array: Any) -> None:
    """Micro-batches read scattered rows: without this hint every page fault reads ahead 128 KiB around
    it, and a party whose table is larger than its memory spends its page cache on rows it never uses."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap_module, "MADV_RANDOM"):
        mapping.madvise(mmap_module.MADV_RANDOM)


def _npz_member(archive: Any, key: str, file: Path, where: str) -> np.ndarray:
    if key not in archive.files:
        raise DataError(f"{file} has no array {key!r}; it holds {archive.files}", where)
    try:
        return archive[key]
    except ValueError as exc:
        raise DataError(f"cannot load {key!r} from {file} (pickled/object arrays are refused): {exc}", where) from None


# Row counts without reading the data (a shape probe reads a few rows; the split needs the count).
register_row_count("csv", lambda base, path, **_: _arrow().csv_rows(resolve_path(base, path, "dataset 'csv'.options.path")))
register_row_count("parquet", lambda base, path, **_: _arrow().parquet_rows(
    resolve_path(base, path, "dataset 'parquet'.options.path"), "dataset 'parquet'"))
for _name in ("arrow", "feather"):
    register_row_count(_name, lambda base, path, **_: _arrow().ipc_rows(
        resolve_path(base, path, "dataset 'arrow'.options.path"), "dataset 'arrow'"))
register_row_count("numpy", lambda base, path, **_: len(
    _np_load(resolve_path(base, path, "dataset 'numpy'.options.path"), "dataset 'numpy'", mmap=True)))


def _arrow():
    from meshsl.data import arrow_files
    return arrow_files
