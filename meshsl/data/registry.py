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

import importlib
import importlib.util
import inspect
import math
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from meshsl.data.selection import Selection, resolve_columns
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


RowCount = Callable[..., int]
ROW_COUNTS: dict[str, RowCount] = {}


def register_row_count(name: str, count: RowCount) -> None:
    """`count(base_dir, **options) -> rows` of dataset `name`, answered without loading it."""
    ROW_COUNTS[name] = count


def dataset_rows(spec: DatasetSpec, base_dir: Path | str = ".") -> int:
    """How many rows a dataset has: from the file's metadata where a counter is registered."""
    counter, loader = ROW_COUNTS.get(spec.name), DATASETS.get(spec.name)
    if counter is None or loader is None:
        return len(load_dataset(spec, base_dir).features)
    _check_options(loader, spec.options, f"dataset {spec.name!r}")
    return counter(Path(base_dir).expanduser().resolve(), **spec.options)


_cache: dict[str, Table] = {}
_cache_lock = threading.Lock()


def clear_dataset_cache() -> None:
    with _cache_lock:
        _cache.clear()


def load_dataset(spec: DatasetSpec, base_dir: Path | str = ".", select: Optional[Selection] = None) -> Table:
    """Load (once per process) the dataset a spec describes; relative paths resolve against base_dir.

    With `select`, a loader that projects (`projects(loader)`) converts only the selected columns and rows;
    the Table it returns holds exactly those. Other loaders ignore it (select from their Table)."""
    base = Path(base_dir).expanduser().resolve()
    loader = DATASETS.get(spec.name)
    if select is not None and (loader is None or not projects(loader)):
        select = None
    key = f"{spec.model_dump_json()}|{base}|{select.key() if select else ''}"
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    where = f"dataset {spec.name!r}"
    if loader is None:
        raise DataError(f"unknown dataset {spec.name!r}; known datasets: {', '.join(sorted(DATASETS))}", where)
    _check_options(loader, spec.options, where)
    table = loader(base, **spec.options) if select is None else loader(base, select=select, **spec.options)
    if not isinstance(table, Table):
        raise DataError(f"loader returned {type(table).__name__}, not a Table", where)
    with _cache_lock:
        return _cache.setdefault(key, table)


def projects(loader: Loader) -> bool:
    """Whether a loader takes a `select` argument (reads only the selected columns and rows)."""
    return "select" in inspect.signature(loader).parameters


def _check_options(loader: Loader, options: dict[str, Any], where: str) -> None:
    params = {n: p for n, p in inspect.signature(loader).parameters.items() if n != "select"}
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
    y, num_classes = (None, None) if labels is None else normalise_labels(labels, where)
    if y is not None and len(y) != len(x):
        raise DataError(f"{len(y)} labels for {len(x)} feature rows", where)
    if feature_names is None:
        names = tuple(f"f{i}" for i in range(x.shape[1])) if x.ndim == 2 else ()
    else:
        names = tuple(str(n) for n in feature_names)
        if x.ndim != 2 or len(names) != x.shape[1] or len(set(names)) != len(names):
            raise DataError(f"need {x.shape[1]} distinct feature names for features of shape {x.shape}", where)
    return Table(features=x, labels=y, num_classes=num_classes, feature_names=names)


def normalise_labels(labels: Any, where: str) -> tuple[np.ndarray, int | None]:
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


def resolve_path(base_dir: Path, path: Any, where: str) -> Path:
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
        shape = [int(shape)]
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

def column_indices(table: Table, columns: Any) -> list[int] | None:
    """Column positions a `columns:` value selects; None means all of them (any feature rank)."""
    if isinstance(columns, str) and columns == "all":
        return None
    if table.features.ndim != 2:
        raise DataError(f"only 'all' can select from features of shape {table.feature_shape}; "
                        f"column selection needs 2-D [N, D] features", "columns")
    return resolve_columns(table.feature_names, columns)


def select_columns(table: Table, columns: Any = "all") -> np.ndarray:
    """Features restricted to `columns`: 'all', a list of ints and/or feature names, or an 'a:b' slice."""
    chosen = column_indices(table, columns)
    return table.features if chosen is None else table.features[:, chosen]


def selected_shape(table: Table, columns: Any = "all") -> tuple[int, ...]:
    """Per-sample shape of `select_columns(table, columns)`, without copying data."""
    chosen = column_indices(table, columns)
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
