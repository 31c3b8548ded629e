"""NoPeek regulariser (Vepakomma et al. 2020): penalise distance correlation between raw inputs
and the activations that leave the node, so the cut layer carries less recoverable input."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from meshsl.errors import ConfigError
from meshsl.privacy.dcor import distance_correlation


class NoPeekSpec(BaseModel):
    """How strongly a node penalises dCor(raw input, cut-layer activation)."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(ge=0.0, allow_inf_nan=False)


def nopeek_loss(raw: Tensor, activation: Tensor, weight: float) -> Tensor:
    """weight * dCor(raw, activation); add it to the task loss before backward()."""
    if not weight >= 0.0 or weight == float("inf"):
        raise ConfigError(f"nopeek weight must be a finite number >= 0, got {weight!r}")
    if weight == 0.0:
        # Skip the O(n^2) distance matrices, but stay in the graph so callers can always backward().
        return (activation * 0.0).sum()
    # Gradients must not flow into the raw data (it is a leaf anyway, but it may come from a transform).
    return weight * distance_correlation(raw.detach(), activation)
