"""The `dataset:` and `partition:` blocks of a topology, as pydantic models (unknown keys are errors).

Loader options are checked against the chosen loader when the dataset is loaded (see
`meshsl.data.registry.load_dataset`), because custom loaders can be registered after parsing.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class DatasetSpec(BaseModel):
    """Which dataset to load and how much of it to hold out for evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="registry key: digits, breast_cancer, synthetic, csv, numpy, factory, ...")
    test_fraction: float = Field(default=0.2, ge=0.0, lt=1.0, description="share of rows held out for evaluation")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the loader")


class PartitionSpec(BaseModel):
    """How the training rows are divided between replicated clients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["iid", "dirichlet", "label_skew"] = "iid"
    alpha: float = Field(default=0.5, gt=0.0, description="Dirichlet concentration; small = more label skew")
    classes_per_client: int = Field(default=2, ge=1, description="label_skew: classes each client holds")
    min_samples: int = Field(default=8, ge=1, description="every shard gets at least this many rows")
