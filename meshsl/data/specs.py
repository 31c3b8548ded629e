"""The `dataset:` and `partition:` blocks of a topology: defined with the schema (meshsl.config.specs)."""
from meshsl.config.specs import DatasetSpec, PartitionSpec

__all__ = ["DatasetSpec", "PartitionSpec"]
