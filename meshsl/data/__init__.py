"""Datasets, column selection, train/test split, client partitions and deterministic batches."""
from meshsl.data.partition import label_counts, partition
from meshsl.data.registry import (
    DATASETS,
    Table,
    clear_dataset_cache,
    load_dataset,
    make_table,
    register_dataset,
    select_columns,
    selected_shape,
    train_test_indices,
)
from meshsl.data.sampler import batch_indices, eval_batches, steps_per_epoch
from meshsl.data.specs import DatasetSpec, PartitionSpec

__all__ = [
    "DATASETS", "DatasetSpec", "PartitionSpec", "Table", "batch_indices", "clear_dataset_cache", "eval_batches",
    "label_counts", "load_dataset", "make_table", "partition", "register_dataset", "select_columns",
    "selected_shape", "steps_per_epoch", "train_test_indices",
]
