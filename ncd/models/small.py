"""A small CNN for the CPU default (8×8 digits up to 32×32 images)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Four 3×3 conv-BN-ReLU layers with a 2×2 max-pool after the second, then an adaptive
    average pool to ``pool × pool`` cells, flattened: ``2 · width · pool²`` features.

    Keeping a coarse spatial grid (``pool`` > 1) matters for tiny images such as 8×8 digits,
    where a global average would throw away where the strokes are.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, pool: int = 2) -> None:
        super().__init__()

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
        )
        self.out_dim = 2 * width * pool * pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
