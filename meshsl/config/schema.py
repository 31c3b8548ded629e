"""The YAML schema of a topology, as pydantic models (unknown keys are errors everywhere)."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from meshsl.config.specs import (ActivationDPSpec, CompressionSpec, DatasetSpec, GradientDefenceSpec, HijackCheckSpec,
                                 GenerateSpec, LabelDPSpec, LLMPartSpec, PartitionSpec,
                                 PreprocessSpec)

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$"
ENDPOINT_PATTERN = re.compile(r"^(tcp://[^:/\s]+:\d{1,5}|ipc://\S+|inproc://\S+)$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_endpoint(value: str) -> str:
    if not ENDPOINT_PATTERN.match(value):
        raise ValueError(f"{value!r} is not an endpoint like tcp://host:port, ipc://path or inproc://name")
    if value.startswith("tcp://") and not 0 < int(value.rsplit(":", 1)[1]) < 65536:
        raise ValueError(f"port of {value!r} is out of range")
    return value


Endpoint = Annotated[str, AfterValidator(_check_endpoint)]


class RayNodeSpec(Strict):
    """How `meshsl simulate --engine ray` hosts this node: its logical nodes (one per client lane when
    replicated) are divided between `actors` Ray actors, each reserving these resources."""

    num_cpus: float = Field(default=1.0, ge=0, description="CPUs each actor reserves")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs each actor reserves")
    actors: int = Field(default=1, ge=1, le=100_000, description="actors sharing this node's client lanes")


class RaySpec(Strict):
    """Cluster-wide settings of the Ray engine (see docs/performance.md)."""

    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="SPREAD", description="placement group strategy for the actors' bundles")
    ready_timeout_s: float = Field(default=120.0, gt=0,
                                   description="wait this long for the resources, then for the actors to start")


class NodeSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    endpoint: Optional[Endpoint] = Field(default=None, description="where the node binds (required unless inbound: false)")
    party: str = Field(pattern=NAME_PATTERN, description="privacy domain (organisation) the node belongs to")
    metrics_port: Optional[int] = Field(default=None, ge=0, le=65535)
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    standby: list[Endpoint] = Field(default_factory=list, description="endpoints of hot standbys")
    public_key: Optional[str] = Field(default=None, description="CURVE public key (z85)")
    threads: int = Field(default=1, ge=1, le=256, description="torch intra-op threads of the compute thread")
    ray: Optional[RayNodeSpec] = Field(default=None, description="resources under `meshsl simulate --engine ray`")
    inbound: bool = Field(default=True, description="accepts inbound connections; false: a dial-out node that "
                          "binds nothing and reaches its peers over connections it opens (behind a firewall)")

    @model_validator(mode="after")
    def _endpoint_if_inbound(self) -> "NodeSpec":
        if self.inbound and self.endpoint is None:
            raise ValueError(f"node {self.name!r} needs an endpoint (or `inbound: false` for a node that only "
                             f"dials out)")
        if not self.inbound and (self.endpoint is not None or self.standby):
            raise ValueError(f"node {self.name!r} has `inbound: false` and binds nothing: remove its "
                             f"{'endpoint' if self.endpoint is not None else 'standby endpoints'} (a restarted "
                             f"dial-out node simply connects again, from any address)")
        return self


class DataSpec(Strict):
    """A data source: features (or labels) of a dataset held by one node."""

    name: str = Field(pattern=NAME_PATTERN)
    node: str
    dataset: DatasetSpec
    kind: Literal["features", "labels"] = "features"
    columns: Union[Literal["all"], str, list[Union[int, str]]] = "all"
    id_column: Optional[str] = Field(default=None, min_length=1,
                                     description="csv dataset: the column naming each row's sample id (not a feature)")
    id_file: Optional[str] = Field(default=None, min_length=1,
                                   description="a text file with one sample id per line, line i naming row i")
    preprocess: Optional[PreprocessSpec] = Field(
        default=None, description="impute and scale this party's columns, fitted on its own training rows")

    @model_validator(mode="after")
    def _one_id_source(self) -> "DataSpec":
        if self.id_column is not None and self.id_file is not None:
            raise ValueError("give the sample ids either as 'id_column' or as 'id_file', not both")
        if self.id_column is not None and self.dataset.name not in ("csv", "parquet", "arrow", "feather"):
            raise ValueError(f"'id_column' needs a csv, parquet or arrow dataset (this one is "
                             f"{self.dataset.name!r}); use 'id_file' for other datasets")
        if self.preprocess is not None and self.kind == "labels":
            raise ValueError("'preprocess' applies to features; a labels source is used as it is")
        return self

    @property
    def has_ids(self) -> bool:
        return self.id_column is not None or self.id_file is not None

    @property
    def source_dataset(self) -> DatasetSpec:
        """The dataset as loaded: a csv id column is not a feature."""
        if self.id_column is None:
            return self.dataset
        return self.dataset.model_copy(update={"options": {**self.dataset.options, "id_column": self.id_column}})


LayerSpec = list[Any]  # [TypeName, *positional args, optional {kwargs}]


class FactorySpec(Strict):
    target: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)


class SegmentSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    node: str
    inputs: list[str] = Field(min_length=1)
    merge: Literal["concat", "sum", "mean"] = "concat"
    layers: Optional[list[LayerSpec]] = None
    factory: Optional[FactorySpec] = None
    llm: Optional[LLMPartSpec] = Field(default=None, description="a part of a local Hugging Face causal LM")
    optimizer: Optional[OptimizerSpec] = None

    @model_validator(mode="after")
    def _one_body(self) -> "SegmentSpec":
        if sum(body is not None for body in (self.layers, self.factory, self.llm)) != 1:
            raise ValueError("a segment needs exactly one of 'layers', 'factory' or 'llm'")
        return self


class TaskSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    output: str = Field(description="segment whose output feeds the loss")
    labels: str = Field(description="data source of kind 'labels'")
    loss: Literal["cross_entropy", "bce_with_logits", "mse", "causal_lm"] = "cross_entropy"
    weight: float = Field(default=1.0, gt=0)
    metrics: list[Literal["accuracy", "f1", "auroc", "perplexity"]] = Field(
        default_factory=lambda: ["accuracy"])  # type: ignore[arg-type]  # (a list of the literal: mypy reads str)
    generate: Optional[GenerateSpec] = Field(default=None, description="causal_lm: decoding in `meshsl predict`")


class EdgePrivacySpec(Strict):
    """Per cut edge (segment output crossing to another party) privacy and compression settings."""

    segment: str = Field(description="segment whose output is the cut activation")
    nopeek: float = Field(default=0.0, ge=0, description="weight of the distance-correlation loss")
    dp: Optional[ActivationDPSpec] = None
    forward: CompressionSpec = Field(default_factory=CompressionSpec)
    backward: CompressionSpec = Field(default_factory=CompressionSpec)
    gradient: Optional[GradientDefenceSpec] = Field(
        default=None, description="label-leakage defence on the gradients sent back over this edge")
    hijack_check: Optional[HijackCheckSpec] = Field(
        default=None, description="client holding its labels: SplitGuard-style probe of the gradients it gets")
    record: Optional[str] = Field(
        default=None, min_length=1,
        description="directory (relative to the topology file) where each receiving node records, per training "
                    "step, the gradient and activation rows it received over this segment's cut edges, with "
                    "their sample ids (for `meshsl audit --run DIR`)")


class ClientsSpec(Strict):
    """Many clients: the listed nodes (and the segments and data on them) are replicated per client."""

    count: int = Field(ge=1, le=100_000)
    replicate: list[str] = Field(min_length=1, description="nodes replicated once per client")
    mode: Literal["splitfed", "sequential"] = "splitfed"
    average_every: int = Field(default=1, ge=1, description="SplitFed: FedAvg client segments every K steps")
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    on_loss: Literal["wait", "drop"] = Field(
        default="wait", description="a lost client node: wait (fail over: restore and replay with it) or drop "
                                    "(go on over the survivors; it rejoins at a later barrier; docs/failover.md)")
    min_clients: Optional[int] = Field(
        default=None, ge=1, description="on_loss: drop: the run fails on every party below this many clients "
                                        "(default 1)")

    @field_validator("min_clients")
    @classmethod
    def _min_clients_within_count(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        count = info.data.get("count")
        if value is not None and count is not None and value > count:
            raise ValueError(f"min_clients {value} is more than the {count} clients (clients.count)")
        if value is not None and info.data.get("on_loss") != "drop":
            raise ValueError("min_clients applies to `on_loss: drop` only (the default, wait, never goes on "
                             "without a client)")
        return value


class RetryPolicy(Strict):
    timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    backoff_factor: float = Field(default=2.0, ge=1)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_timeout_s: float = Field(default=5.0, gt=0)
    max_restarts: int = Field(default=3, ge=0)
    startup_timeout_s: float = Field(default=60.0, gt=0)
    coordinator_timeout_s: Optional[float] = Field(
        default=None, gt=0, description="a node gives up on a coordinator silent this long "
                                        "(default: heartbeat_timeout_s + startup_timeout_s)")


class CheckpointSpec(Strict):
    every: int = Field(default=0, ge=0, description="checkpoint every N committed steps (0: never)")
    directory: str = "checkpoints"


class MetricsTLSSpec(Strict):
    """HTTPS for the metrics endpoint; with `client_cafile`, only scrapers holding a certificate signed
    by that CA may read it (mutual TLS)."""

    certfile: str
    keyfile: str
    client_cafile: Optional[str] = Field(default=None, description="CA of the scrapers' client certificates")


class SecuritySpec(Strict):
    curve: bool = False
    keys_dir: Optional[str] = None
    max_message_bytes: int = Field(default=256 * 2**20, gt=0)
    metrics_bind: str = Field(default="127.0.0.1", description="address the metrics endpoints listen on "
                              "(0.0.0.0: every interface; pair it with metrics_tls)")
    metrics_tls: Optional[MetricsTLSSpec] = None


class AlignmentSpec(Strict):
    """Private set intersection of the parties' sample ids before training and prediction (see meshsl.align)."""

    min_intersection: int = Field(default=1, ge=1, description="fewer common samples than this is an error")
    leader: Optional[str] = Field(default=None, description="node running the PSI with every other data node "
                                                            "(default: the first task's label holder)")
    timeout_s: float = Field(default=600.0, gt=0, description="longest wait for a peer's PSI message")


class TrainingSpec(Strict):
    epochs: int = Field(default=1, ge=0)
    steps: Optional[int] = Field(default=None, ge=1, description="total steps; overrides epochs")
    batch_size: int = Field(default=64, ge=1)
    micro_batches: int = Field(default=1, ge=1)
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    window: Optional[int] = Field(default=None, ge=1, description="1F1B: micro-batches in flight per segment "
                                  "(default: micro_batches, so a WAN round trip is paid once per step)")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    seed: int = 0
    eval_every: int = Field(default=0, ge=0, description="evaluate every N steps (0: at the end of each epoch)")
    eval_batch_size: int = Field(default=256, ge=1)
    eval_at_start: bool = Field(default=False, description="also evaluate before the first step (the summary's "
                                                           "tasks.<task>.eval_start: where training started from)")
    deterministic: bool = True
    coordinator: Optional[str] = Field(default=None, description="node hosting the coordinator")
    label_dp: Optional[LabelDPSpec] = None
    staleness: int = Field(default=0, ge=0, le=64, description="latency hiding: step r runs forward and backward "
                           "on the weights of step r - staleness (weight stashing, docs/wan.md); 0: synchronous")

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> "TrainingSpec":
        if self.micro_batches > self.batch_size:
            raise ValueError(f"micro_batches ({self.micro_batches}) exceeds batch_size ({self.batch_size})")
        return self


class TopologySpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    nodes: list[NodeSpec] = Field(min_length=1)
    data: list[DataSpec] = Field(min_length=1)
    segments: list[SegmentSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    clients: Optional[ClientsSpec] = None
    privacy: list[EdgePrivacySpec] = Field(default_factory=list)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    security: SecuritySpec = Field(default_factory=SecuritySpec)
    alignment: Optional[AlignmentSpec] = None
    ray: Optional[RaySpec] = Field(default=None, description="`meshsl simulate --engine ray` settings")
