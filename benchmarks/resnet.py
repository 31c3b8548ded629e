"""ResNet-18 for CIFAR-shape inputs (3x32x32), by hand (no torchvision), cut into contiguous segments.

The CIFAR variant: a 3x3 stem convolution (no 7x7, no max-pool), four stages of two BasicBlocks with
64-128-256-512 channels (stride 2 at the start of stages 2-4, 1x1 projection shortcut there), global average
pool and a linear head: about 11.2M parameters and 0.56 G multiply-adds per sample at width 1.

The model is a list of 10 *units* (stem, 8 blocks, head). `segment(start, stop)` builds units
[start, stop) as one nn.Module, so a meshsl topology can place it with a `module:function` factory:

    segments:
      - {name: s0, node: n0, inputs: [x], factory: {target: "benchmarks.resnet:segment",
                                                    kwargs: {start: 0, stop: 5}}}

`balanced_cuts(k)` picks the cut points that give k segments of near-equal forward FLOPs (counted
analytically from the convolution shapes, so nothing is run to decide them)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

BASE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
IMAGE = 32  # CIFAR: 32x32 inputs
UNITS = 1 + len(BASE_CHANNELS) * BLOCKS_PER_STAGE + 1  # stem, 8 blocks, head


def channels(width_multiplier: float = 1.0) -> tuple[int, ...]:
    return tuple(max(1, int(round(c * width_multiplier))) for c in BASE_CHANNELS)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv-BN projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _block_plan(width_multiplier: float) -> list[tuple[int, int, int]]:
    """(in channels, out channels, stride) of the 8 blocks."""
    chans = channels(width_multiplier)
    plan, cin = [], chans[0]
    for s, cout in enumerate(chans):
        for b in range(BLOCKS_PER_STAGE):
            stride = 2 if (s > 0 and b == 0) else 1
            plan.append((cin, cout, stride))
            cin = cout
    return plan


def unit(index: int, width_multiplier: float = 1.0, num_classes: int = 10) -> nn.Module:
    """Unit `index` of the model: 0 the stem, 1..8 the BasicBlocks, 9 the pooled linear head."""
    chans = channels(width_multiplier)
    if index == 0:
        return nn.Sequential(nn.Conv2d(3, chans[0], 3, 1, 1, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU())
    if 1 <= index <= UNITS - 2:
        return BasicBlock(*_block_plan(width_multiplier)[index - 1])
    if index == UNITS - 1:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], num_classes))
    raise ValueError(f"unit index {index} out of range 0..{UNITS - 1}")


def segment(start: int = 0, stop: int = UNITS, width_multiplier: float = 1.0, num_classes: int = 10) -> nn.Module:
    """Units [start, stop) as one nn.Sequential (the meshsl factory; kwargs come from the topology file)."""
    if not 0 <= start < stop <= UNITS:
        raise ValueError(f"need 0 <= start < stop <= {UNITS}, got start={start} stop={stop}")
    return nn.Sequential(*[unit(i, width_multiplier, num_classes) for i in range(start, stop)])


def resnet18(width_multiplier: float = 1.0, num_classes: int = 10) -> nn.Module:
    """The whole (unsplit) model; its state is the concatenation of the segments'."""
    return segment(0, UNITS, width_multiplier, num_classes)


def unit_output_shape(index: int, width_multiplier: float = 1.0, num_classes: int = 10) -> tuple[int, ...]:
    """Per-sample output shape of unit `index` (what crosses a cut placed right after it)."""
    chans = channels(width_multiplier)
    if index == UNITS - 1:
        return (num_classes,)
    stage = 0 if index == 0 else (index - 1) // BLOCKS_PER_STAGE
    side = IMAGE >> stage
    return (chans[stage], side, side)


def unit_macs(width_multiplier: float = 1.0, num_classes: int = 10) -> list[int]:
    """Forward multiply-adds per sample of every unit (convolutions and the linear head)."""
    chans = channels(width_multiplier)
    side = IMAGE
    macs = [3 * chans[0] * 9 * side * side]
    for cin, cout, stride in _block_plan(width_multiplier):
        side //= stride
        block = cin * cout * 9 * side * side + cout * cout * 9 * side * side
        if stride != 1 or cin != cout:
            block += cin * cout * side * side
        macs.append(block)
    macs.append(chans[-1] * num_classes)
    return macs


def balanced_cuts(parts: int, width_multiplier: float = 1.0, costs: Optional[list[int]] = None) -> list[tuple[int, int]]:
    """Contiguous (start, stop) unit ranges of `parts` segments minimising the costliest segment's MACs.

    Exact (dynamic programming over the 10 units). At width 1: 2 parts -> stem+4 blocks | 4 blocks+head;
    4 parts -> one ResNet stage each (stem with stage 1, head with stage 4)."""
    costs = costs if costs is not None else unit_macs(width_multiplier)
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} units into {parts} segments")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-segment cost of cutting units [0, i) into k segments; choice[k][i]: last cut start
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], choice[k][i] = value, j
    cuts, i = [], n
    for k in range(parts, 0, -1):
        j = choice[k][i]
        cuts.append((j, i))
        i = j
    return cuts[::-1]
