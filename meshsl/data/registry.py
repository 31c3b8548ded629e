"""Dataset loaders, column selection and the train/test split.

Sample alignment: in vertical split learning every party holds different columns of the same
samples, and the row index is the shared sample id. Parties never exchange data to agree on which
rows are train or test, or which rows form a batch; each computes the same answer from the row
count and a shared seed (`train_test_indices` here, `meshsl.data.sampler` for batches). That only
works if every party's dataset lists the same samples in the same row order.

Nothing here downloads: digits and breast_cancer ship inside scikit-learn, the rest read local files
or generate data. NumPy files are always read with `allow_pickle=False` (a pickle can run code).
"""
from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from meshsl.data.specs import DatasetSpec
from meshsl.errors import DataError


@dataclass(frozen=True, eq=False)
class Table:
    """A loaded dataset. Row i of features and labels is sample id i.

    Tables are cached and shared within a process: treat the arrays as read-only."""

    features: np.ndarray  # float32 [N, *feature_shape]
    labels: np.ndarray | None  # int64 [N] class ids (float32 [N, ...] for regression targets)
    num_classes: int | None  # None without labels or for regression targets
    feature_names: tuple[str, ...]  # one per column for 2-D features, () otherwise
    ids: tuple[str, ...] | None = None  # each row's sample id when the source names an id column

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])


Loader = Callable[..., Table]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register `fn(base_dir: Path, **options) -> Table` under `name` (the DatasetSpec.name)."""

    def decorate(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return decorate


_cache: dict[str, Table] = {}
_cache_lock = threading.Lock()


def clear_dataset_cache() -> None:
    with _cache_lock:
        _cache.clear()


def load_dataset(spec: DatasetSpec, base_dir: Path | str = ".") -> Table:
    """Load (once per process) the dataset a spec describes; relative paths resolve against base_dir."""
    base = Path(base_dir).expanduser().resolve()
    key = f"{spec.model_dump_json()}|{base}"
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    where = f"dataset {spec.name!r}"
    loader = DATASETS.get(spec.name)
    if loader is None:
        raise DataError(f"unknown dataset {spec.name!r}; known datasets: {', '.join(sorted(DATASETS))}", where)
    _check_options(loader, spec.options, where)
    table = loader(base, **spec.options)
    if not isinstance(table, Table):
        raise DataError(f"loader returned {type(table).__name__}, not a Table", where)
    with _cache_lock:
        return _cache.setdefault(key, table)


def _check_options(loader: Loader, options: dict[str, Any], where: str) -> None:
    params = inspect.signature(loader).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the loader takes anything; it checks its own options
    known = [n for n, p in list(params.items())[1:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]  # [0]: base_dir
    for name in options:
        if name not in known:
            raise DataError(f"unknown option {name!r}; this loader takes: {', '.join(known) or 'no options'}",
                            f"{where}.options")
    missing = [n for n in known if params[n].default is inspect.Parameter.empty and n not in options]
    if missing:
        raise DataError(f"missing required option(s): {', '.join(missing)}", f"{where}.options")


# ---------------------------------------------------------------- building and checking tables

def make_table(features: Any, labels: Any, where: str, feature_names: Sequence[str] | None = None) -> Table:
    """Check shapes and values, convert dtypes, and wrap arrays into a Table."""
    x = np.asarray(features)
    if x.dtype.kind not in "biuf":
        raise DataError(f"features must be numeric, got dtype {x.dtype}", where)
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"features must have shape [N, ...] with N >= 1 and at least 2 dims, got {x.shape}", where)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError("features contain NaN or infinite values", where)
    y, num_classes = (None, None) if labels is None else _normalise_labels(labels, where)
    if y is not None and len(y) != len(x):
        raise DataError(f"{len(y)} labels for {len(x)} feature rows", where)
    if feature_names is None:
        names = tuple(f"f{i}" for i in range(x.shape[1])) if x.ndim == 2 else ()
    else:
        names = tuple(str(n) for n in feature_names)
        if x.ndim != 2 or len(names) != x.shape[1] or len(set(names)) != len(names):
            raise DataError(f"need {x.shape[1]} distinct feature names for features of shape {x.shape}", where)
    return Table(features=x, labels=y, num_classes=num_classes, feature_names=names)


def _normalise_labels(labels: Any, where: str) -> tuple[np.ndarray, int | None]:
    """Whole numbers become int64 class ids; other numbers stay float32 regression targets."""
    y = np.asarray(labels)
    if y.dtype.kind not in "biuf":
        raise DataError(f"labels must be numeric, got dtype {y.dtype}", where)
    if y.ndim == 0:
        raise DataError("labels must be an array with one entry per row, got a scalar", where)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError("labels contain NaN or infinite values", where)
        if not np.array_equal(y, np.round(y)):
            return np.ascontiguousarray(y, dtype=np.float32), None
    if y.ndim != 1:
        raise DataError(f"class labels must have shape [N], got {y.shape}", where)
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"class labels must be >= 0, found {int(y.min())}", where)
    return y, int(y.max()) + 1 if len(y) else 0


def _resolve(base_dir: Path, path: Any, where: str) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise DataError(f"expected a file path, got {path!r}", where)
    full = Path(path).expanduser()
    full = full if full.is_absolute() else base_dir / full
    if not full.is_file():
        raise DataError(f"file not found: {full}", where)
    return full


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"option {name!r} must be a positive integer, got {value!r}", f"{where}.options.{name}")
    return int(value)


# ---------------------------------------------------------------- built-in loaders

def _sklearn_data_file(name: str) -> Path:
    """A data file shipped inside scikit-learn, found without importing sklearn (which pulls in
    scipy and costs seconds of start-up in every node process)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("scikit-learn is not installed (it ships this dataset)", f"dataset file {name!r}")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.exists():
        raise DataError(f"scikit-learn has no bundled file {path}", f"dataset file {name!r}")
    return path


@register_dataset("digits")
def _load_digits(base_dir: Path, *, image: bool = False) -> Table:
    """8x8 handwritten digits bundled with scikit-learn: 1797 rows, 10 classes, pixels scaled to [0, 1]."""
    raw = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",")  # same file load_digits reads
    x = raw[:, :-1].astype(np.float32) / 16.0
    target = raw[:, -1].astype(np.int64)
    if image:
        return make_table(x.reshape(-1, 1, 8, 8), target, "dataset 'digits'")
    names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    return make_table(x, target, "dataset 'digits'", names)


@register_dataset("breast_cancer")
def _load_breast_cancer(base_dir: Path) -> Table:
    """Wisconsin breast cancer (bundled with scikit-learn): 569 rows, 30 z-scored columns, 2 classes."""
    raw = np.loadtxt(_sklearn_data_file("breast_cancer.csv"), delimiter=",", skiprows=1)
    x, target = raw[:, :-1], raw[:, -1].astype(np.int64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return make_table(x, target, "dataset 'breast_cancer'", BREAST_CANCER_FEATURES)


_MEASURES = ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity",
             "concave points", "symmetry", "fractal dimension")
BREAST_CANCER_FEATURES = ([f"mean {m}" for m in _MEASURES] + [f"{m} error" for m in _MEASURES]
                          + [f"worst {m}" for m in _MEASURES])  # scikit-learn's names


@register_dataset("synthetic")
def _load_synthetic(base_dir: Path, *, shape: Sequence[int] = (16,), num_samples: int = 1024,
                    num_classes: int = 4, seed: int = 0) -> Table:
    """Gaussian features of any shape; labels come from a fixed random linear teacher, so they are learnable."""
    where = "dataset 'synthetic'"
    if isinstance(shape, (int, np.integer)):
        shape = [shape]
    if not isinstance(shape, (list, tuple)) or not shape:
        raise DataError(f"option 'shape' must be a list of positive integers, got {shape!r}", f"{where}.options.shape")
    dims = [_positive_int(d, "shape", where) for d in shape]
    n = _positive_int(num_samples, "num_samples", where)
    k = _positive_int(num_classes, "num_classes", where)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"option 'seed' must be an integer >= 0, got {seed!r}", f"{where}.options.seed")
    rng = np.random.default_rng(int(seed))
    x = rng.standard_normal((n, *dims), dtype=np.float32)
    teacher = rng.standard_normal((math.prod(dims), k))
    labels = np.argmax(x.reshape(n, -1) @ teacher, axis=1)
    return make_table(x, labels, where)


@register_dataset("csv")
def _load_csv(base_dir: Path, *, path: str, label_column: str | None = None, delimiter: str = ",",
              id_column: str | None = None) -> Table:
    """A CSV file with a header row; every column but `label_column` and `id_column` must be numeric."""
    where = "dataset 'csv'"
    file = _resolve(base_dir, path, f"{where}.options.path")
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {file}: {exc}", where) from None
    rows = [r for r in rows if r]  # blank lines
    if len(rows) < 2:
        raise DataError(f"{file} needs a header row and at least one data row", where)
    header = [h.strip() for h in rows[0]]
    label_at = None
    if label_column is not None:
        if label_column not in header:
            raise DataError(f"label_column {label_column!r} is not in the header {header}",
                            f"{where}.options.label_column")
        label_at = header.index(label_column)
    id_at = None
    if id_column is not None:
        if id_column not in header:
            raise DataError(f"{file}: id column {id_column!r} is not in the header {header}", f"{where}.id_column")
        id_at = header.index(id_column)
    feature_at = [i for i in range(len(header)) if i not in (label_at, id_at)]
    values = np.empty((len(rows) - 1, len(feature_at)), dtype=np.float64)
    raw_labels: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{file}:{line} has {len(row)} fields, the header has {len(header)}", where)
        for j, i in enumerate(feature_at):
            try:
                values[line - 2, j] = float(row[i])
            except ValueError:
                raise DataError(f"{file}:{line} column {header[i]!r}: {row[i]!r} is not a number", where) from None
        if label_at is not None:
            raw_labels.append(row[label_at].strip())
    labels = _csv_labels(raw_labels) if label_at is not None else None
    table = make_table(values, labels, where, [header[i] for i in feature_at])
    if id_at is not None:
        table = replace(table, ids=tuple(row[id_at].strip() for row in rows[1:]))
    return table


def _csv_labels(raw: list[str]) -> np.ndarray:
    """Numeric label columns keep their values; text labels become class ids in sorted order."""
    try:
        return np.array([float(v) for v in raw])
    except ValueError:
        classes = sorted(set(raw))
        ids = {c: i for i, c in enumerate(classes)}
        return np.array([ids[v] for v in raw], dtype=np.int64)


@register_dataset("numpy")
def _load_numpy(base_dir: Path, *, path: str, labels: str | None = None, features_key: str = "x",
                labels_key: str | None = None) -> Table:
    """Features from a .npy file (labels from another .npy) or from keys of one .npz archive."""
    where = "dataset 'numpy'"
    file = _resolve(base_dir, path, f"{where}.options.path")
    if file.suffix == ".npz":
        with _np_load(file, where) as archive:
            x = _npz_member(archive, features_key, file, where)
            y = None if labels_key is None else _npz_member(archive, labels_key, file, where)
    else:
        if labels_key is not None:
            raise DataError("labels_key only applies to .npz archives; use 'labels: file.npy'", f"{where}.options")
        x = _np_load(file, where)
        y = None
    if labels is not None:
        if y is not None:
            raise DataError("give labels either as 'labels' (a file) or 'labels_key', not both", f"{where}.options")
        y = _np_load(_resolve(base_dir, labels, f"{where}.options.labels"), where)
    if not isinstance(x, np.ndarray) or (y is not None and not isinstance(y, np.ndarray)):
        raise DataError("expected .npy arrays (a .npz archive needs features_key)", where)
    return make_table(x, y, where)


def _np_load(file: Path, where: str) -> Any:
    try:
        return np.load(file, allow_pickle=False)  # never unpickle: a pickle can run arbitrary code
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot load {file} (pickled/object arrays are refused): {exc}", where) from None


def _npz_member(archive: Any, key: str, file: Path, where: str) -> np.ndarray:
    if key not in archive.files:
        raise DataError(f"{file} has no array {key!r}; it holds {archive.files}", where)
    try:
        return archive[key]
    except ValueError as exc:
        raise DataError(f"cannot load {key!r} from {file} (pickled/object arrays are refused): {exc}", where) from None


@register_dataset("factory")
def _load_factory(base_dir: Path, *, target: str, kwargs: dict[str, Any] | None = None) -> Table:
    """Call `package.module:function(**kwargs)`, which returns `(features, labels)` or a Table."""
    where = "dataset 'factory'"
    if not isinstance(target, str) or target.count(":") != 1:
        raise DataError(f"target must look like 'package.module:function', got {target!r}", f"{where}.options.target")
    module_name, attr = target.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"cannot import {target!r}: {exc}", f"{where}.options.target") from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise DataError(f"kwargs must be a mapping, got {type(kwargs).__name__}", f"{where}.options.kwargs")
    try:
        result = fn(**(kwargs or {}))
    except DataError:
        raise
    except Exception as exc:  # user code: report it as a data problem, keep the traceback chained
        raise DataError(f"{target} raised {type(exc).__name__}: {exc}", where) from exc
    if isinstance(result, Table):
        table = make_table(result.features, result.labels, where, result.feature_names or None)
        if result.num_classes is not None and table.num_classes is not None:
            # the factory may know of classes that happen to be absent from its rows
            table = replace(table, num_classes=max(result.num_classes, table.num_classes))
        return table
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DataError(f"{target} must return (features, labels) or a Table, got {type(result).__name__}", where)
    return make_table(result[0], result[1], where)


# ---------------------------------------------------------------- column selection and split

def _column_indices(table: Table, columns: Any) -> list[int] | None:
    """Column positions a `columns:` value selects; None means all of them (any feature rank)."""
    where = "columns"
    if isinstance(columns, str) and columns == "all":
        return None
    if table.features.ndim != 2:
        raise DataError(f"only 'all' can select from features of shape {table.feature_shape}; "
                        f"column selection needs 2-D [N, D] features", where)
    width = table.features.shape[1]
    if isinstance(columns, str):
        if ":" in columns:
            return _slice_indices(columns, width, where)
        columns = [columns]
    if not isinstance(columns, (list, tuple)) or not columns:
        raise DataError(f"expected 'all', an 'a:b' slice or a non-empty list of columns, got {columns!r}", where)
    positions = {name: i for i, name in enumerate(table.feature_names)}
    chosen: list[int] = []
    for item in columns:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < width:
                raise DataError(f"column {item} is out of range; features have {width} columns", where)
            chosen.append(int(item))
        elif isinstance(item, str) and item in positions:
            chosen.append(positions[item])
        else:
            known = ", ".join(list(table.feature_names)[:8]) + (", ..." if width > 8 else "")
            raise DataError(f"unknown column {item!r}; columns are 0..{width - 1} or names like {known}", where)
    if len(set(chosen)) != len(chosen):
        raise DataError(f"columns {columns!r} select a column twice", where)
    return chosen


def _slice_indices(text: str, width: int, where: str) -> list[int]:
    parts = text.split(":")
    try:
        bounds = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        bounds = []
    if not 2 <= len(parts) <= 3 or not bounds or (len(bounds) == 3 and bounds[2] == 0):
        raise DataError(f"{text!r} is not a slice like '0:10', '5:' or '::2'", where)
    chosen = list(range(width))[slice(*bounds)]
    if not chosen:
        raise DataError(f"slice {text!r} selects no columns of {width}", where)
    return chosen


def select_columns(table: Table, columns: Any = "all") -> np.ndarray:
    """Features restricted to `columns`: 'all', a list of ints and/or feature names, or an 'a:b' slice."""
    chosen = _column_indices(table, columns)
    return table.features if chosen is None else table.features[:, chosen]


def selected_shape(table: Table, columns: Any = "all") -> tuple[int, ...]:
    """Per-sample shape of `select_columns(table, columns)`, without copying data."""
    chosen = _column_indices(table, columns)
    return table.feature_shape if chosen is None else (len(chosen),)


def train_test_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row ids; the same on every party for the same (n, test_fraction, seed)."""
    where = "train/test split"
    if n < 1:
        raise DataError(f"cannot split {n} rows", where)
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}", where)
    n_test = int(round(n * test_fraction))
    if test_fraction > 0:
        n_test = min(max(n_test, 1), n - 1)  # a non-zero fraction always leaves both sides non-empty
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]).astype(np.int64), np.sort(order[:n_test]).astype(np.int64)
