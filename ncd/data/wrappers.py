"""Dataset wrappers that turn a base dataset of ``(PIL image, target)`` into what a stage trains on."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ncd.errors import NcdError


class _Wrapper(Dataset):
    """One item per item of ``base``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)


class Transformed(_Wrapper):
    """``(transform(img), target, index)``."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        super().__init__(base)
        self.transform = transform

    def __getitem__(self, i: int):
        img, target = self.base[i]
        return self.transform(img), target, i


class MultiView(_Wrapper):
    """``(views [V, C, H, W], target, index)``: one independent draw per transform."""

    def __init__(self, base: Dataset, transforms: Sequence[Callable]) -> None:
        super().__init__(base)
        self.transforms = list(transforms)

    def views(self, img) -> torch.Tensor:
        """``[V, C, H, W]``: each transform applied to ``img``, in order."""
        return torch.stack([t(img) for t in self.transforms])

    def __getitem__(self, i: int):
        img, target = self.base[i]
        return self.views(img), target, i


class NeighborsDataset(_Wrapper):
    """SCAN's training pairs: ``(anchor, neighbour, target, index)``.

    Keeps the first ``num_neighbors + 1`` columns of the neighbour table (column 0 is the
    sample itself) and draws one column uniformly per access, so the anchor is its own
    "neighbour" with probability 1/(k+1), as in the official code.
    """

    def __init__(self, base: Dataset, neighbors: np.ndarray, anchor_transform: Callable,
                 neighbor_transform: Callable, num_neighbors: int) -> None:
        if neighbors.shape[0] != len(base):
            raise NcdError(f"neighbour table has {neighbors.shape[0]} rows, expected {len(base)} (one per image)")
        super().__init__(base)
        self.neighbors = np.asarray(neighbors)[:, : num_neighbors + 1]
        self.anchor_transform, self.neighbor_transform = anchor_transform, neighbor_transform

    def __getitem__(self, i: int):
        anchor, target = self.base[i]
        j = int(np.random.choice(self.neighbors[i]))
        neighbor, _ = self.base[j]
        return self.anchor_transform(anchor), self.neighbor_transform(neighbor), target, i


class WeakStrong(_Wrapper):
    """Self-labeling pairs: ``(weak view, strong view, target, index)``."""

    def __init__(self, base: Dataset, weak: Callable, strong: Callable) -> None:
        super().__init__(base)
        self.weak, self.strong = weak, strong

    def __getitem__(self, i: int):
        img, target = self.base[i]
        return self.weak(img), self.strong(img), target, i
