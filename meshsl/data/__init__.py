"""Datasets, column selection, train/test split, client partitions and deterministic batches."""
from meshsl.data import file_loaders  # noqa: F401  (registers csv, parquet, arrow, feather, numpy)
from meshsl.data import catalogue  # noqa: F401  (registers catalogue: data by a site's catalogue name)
from meshsl.data import text  # noqa: F401  (registers text: tokenised, packed sequences)
from meshsl.data.partition import label_counts, partition
from meshsl.data.registry import (
    DATASETS,
    Table,
    clear_dataset_cache,
    dataset_rows,
    load_dataset,
    make_table,
    register_dataset,
    select_columns,
    selected_shape,
    train_test_indices,
)
from meshsl.data.selection import Selection
from meshsl.data.sources import load_source, selection_of
from meshsl.data.sampler import batch_indices, eval_batches, steps_per_epoch
from meshsl.data.specs import DatasetSpec, PartitionSpec

__all__ = [
    "DATASETS", "DatasetSpec", "PartitionSpec", "Selection", "Table", "batch_indices", "clear_dataset_cache",
    "dataset_rows", "eval_batches", "load_source", "selection_of",
    "label_counts", "load_dataset", "make_table", "partition", "register_dataset", "select_columns",
    "selected_shape", "steps_per_epoch", "train_test_indices",
]
