"""The blocks of a topology that the feature packages act on (codecs, privacy, datasets), as pydantic models.

They live here, under the schema, so that parsing a topology needs neither torch nor the packages
that use these settings (meshsl.protocol.compression, meshsl.privacy, meshsl.data import them from here).
Dataset loader options are checked against the chosen loader when the dataset is loaded (see
`meshsl.data.registry.load_dataset`), because custom loaders can be registered after parsing.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CompressionSpec(BaseModel):
    """Which codec an edge direction uses; ratio and error_feedback only matter for top-k."""

    model_config = ConfigDict(extra="forbid")

    codec: Literal["none", "fp16", "bf16", "int8", "topk"] = "none"
    ratio: float = Field(0.1, gt=0.0, le=1.0)
    error_feedback: bool = True


class ActivationDPSpec(BaseModel):
    """Per-sample L2 clipping to clip_norm, then Gaussian noise of std noise_multiplier * clip_norm."""

    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(gt=0.0, allow_inf_nan=False)
    noise_multiplier: Optional[float] = Field(default=None, ge=0.0, allow_inf_nan=False)
    target_epsilon: Optional[float] = Field(
        default=None, gt=0.0, allow_inf_nan=False,
        description="calibrate noise_multiplier to this budget; with noise_multiplier given, refuse runs beyond it")
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    amplification: bool = Field(default=False, description="count privacy amplification by subsampling")
    seed: int = 0

    @model_validator(mode="after")
    def _noise_or_budget(self) -> "ActivationDPSpec":
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give noise_multiplier or target_epsilon (to calibrate the noise from)")
        return self


class LabelDPSpec(BaseModel):
    """Randomized response on labels with privacy parameter epsilon."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(gt=0.0, allow_inf_nan=False)


class HijackCheckSpec(BaseModel):
    """`privacy[].hijack_check` on a client's cut segment: probe the server with fake-label batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    probe_probability: float = Field(default=0.2, gt=0.0, lt=1.0)
    warmup: int = Field(default=10, ge=0, description="regular steps before the first probe")
    threshold: float = Field(default=0.1, ge=-1.0, le=1.0, description="flag hijacking below this score")
    min_probes: int = Field(default=5, ge=1)
    seed: int = 0


class GradientDefenceSpec(BaseModel):
    """Noise on the gradient rows a label holder sends back over a cut edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defence: Literal["max_norm", "marvell", "dp"]
    strength: float = Field(default=1.0, gt=0.0, allow_inf_nan=False,
                            description="marvell: noise power as a multiple of ||mean_1 - mean_0||^2")
    clip_norm: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False, description="dp: per-row L2 clip")
    noise_multiplier: Optional[float] = Field(default=None, ge=0.0, allow_inf_nan=False,
                                              description="dp: noise std / clip_norm")
    target_epsilon: Optional[float] = Field(default=None, gt=0.0, allow_inf_nan=False,
                                            description="dp: calibrate noise_multiplier to this budget, or, "
                                                        "with noise_multiplier given, refuse runs beyond it")
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    amplification: bool = Field(default=False, description="dp: count privacy amplification by subsampling")
    floor: Optional[float] = Field(default=None, ge=0.0, allow_inf_nan=False,
                                   description="max_norm, marvell: isotropic noise added to every row, its power "
                                               "a multiple of the micro-batch's largest squared row norm (hides "
                                               "the rows' directions while their norms are still alike; "
                                               "default per defence, see docs/privacy.md)")
    seed: int = 0

    @model_validator(mode="after")
    def _fields_of_kind(self) -> "GradientDefenceSpec":
        if self.defence == "dp":
            if self.clip_norm is None:
                raise ValueError("defence 'dp' needs clip_norm")
            if self.noise_multiplier is None and self.target_epsilon is None:
                raise ValueError("defence 'dp' needs noise_multiplier or target_epsilon")
            if self.floor is not None:
                raise ValueError("floor belongs to defences 'max_norm' and 'marvell', not 'dp'")
        elif self.clip_norm is not None or self.noise_multiplier is not None or self.target_epsilon is not None:
            raise ValueError(f"clip_norm, noise_multiplier and target_epsilon belong to defence 'dp', "
                             f"not {self.defence!r}")
        return self


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


class PreprocessSpec(BaseModel):
    """`data[].preprocess`: a per-party transform fitted on that party's own training rows (never sent).

    It runs as the first layer of the segment that reads the source, so checkpoints, exports, `assemble`
    and `predict` carry and apply exactly the fitted values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    impute: Literal["none", "mean", "zero"] = Field(
        default="none", description="missing values (empty cells, nulls, NaN): an error, or filled")
    scale: Literal["none", "standard", "minmax"] = Field(
        default="none", description="standard: zero mean, unit variance; minmax: [0, 1] on the training rows")


class LoraSpec(BaseModel):
    """`segments[].llm.lora`: low-rank adapters (peft) on the part's linear layers; the base stays frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: list[str] = Field(min_length=1, description="module names to adapt, e.g. [q_proj, v_proj] or [c_attn]")
    r: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = Field(default=0, description="torch seed the adapters of the WHOLE model are drawn with (the part "
                                             "keeps its own): every party draws the same values as one-process peft")


class ModelRecipeSpec(BaseModel):
    """`segments[].llm.create`: build a small model there (once, when the directory is missing), with a
    byte-level BPE tokenizer trained locally on `corpus` (`meshsl llm prepare`; nothing is downloaded)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["llama", "gpt2"] = "llama"
    layers: int = Field(default=6, ge=1, le=64)
    width: int = Field(default=256, ge=16, le=8192)
    heads: int = Field(default=4, ge=1)
    vocab: int = Field(default=2000, ge=300, le=65536)
    context: int = Field(default=256, ge=8)
    corpus: str = Field(description="text file (relative to the topology file) the tokenizer is trained on")
    seed: int = 0


class LLMPartSpec(BaseModel):
    """`segments[].llm`: a part of a Hugging Face causal LM loaded from a local `save_pretrained` directory:
    the token embeddings (`embed`), decoder blocks [blocks[0], blocks[1]) and the final norm + LM head (`head`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="save_pretrained directory (relative to the topology file)")
    embed: bool = False
    blocks: list[int] = Field(default_factory=lambda: [0, 0], min_length=2, max_length=2,
                              description="[first, stop) decoder blocks of this part")
    head: bool = False
    lora: Optional[LoraSpec] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    create: Optional[ModelRecipeSpec] = None

    @model_validator(mode="after")
    def _something(self) -> "LLMPartSpec":
        first, stop = self.blocks
        if first < 0 or stop < first:
            raise ValueError(f"blocks must be [first, stop) with 0 <= first <= stop, got {self.blocks}")
        if not self.embed and not self.head and first == stop:
            raise ValueError("an empty part: give embed, head or some blocks")
        return self


class GenerateSpec(BaseModel):
    """`tasks[].generate` of a causal_lm task: how `meshsl predict` continues each prompt across the split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    strategy: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(default=1.0, gt=0.0)
    top_k: int = Field(default=0, ge=0, description="sample: only from the k likeliest tokens (0: all)")
    seed: int = 0
