"""Normalisations without an epsilon, as the two-stage classifier's official code writes them, and
its fixed normalised softmax head (Han et al., ECCV 2020; METHODS.md 6.4)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ncd.errors import NcdError
from ncd.ops.checks import check_positive, check_tensor

__all__ = ["l2_normalize", "normalized_fc"]


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """The official ``Normalize(2)``: ``x / ||x||`` along ``dim``, no epsilon (a zero vector gives NaN)."""
    return x / x.pow(2).sum(dim, keepdim=True).pow(0.5)


def normalized_fc(features: Tensor, weight: Tensor, temperature: float = 0.1, normalize: str = "row") -> Tensor:
    r"""One fixed normalised softmax head of the two-stage classifier (``_Head_fc``), ``[N, C]``.

    Han et al., ECCV 2020, Eq. 13: :math:`y = \mathrm{softmax}(z\,\hat W / \tau_c)` with
    ``features`` :math:`z` ``[N, d]`` and ``weight`` :math:`W` ``[d, C]``, no bias.

    ``normalize="row"`` (default, the official code): :math:`\hat W_{k,:} = W_{k,:} / \lVert W_{k,:}\rVert`,
    each feature row normalised across the C classes (the official ``Normalize`` applied to the
    ``d × C`` matrix). ``normalize="column"`` (the paper's Eq. 13): each class vector
    :math:`W_{:,j}` has unit length.
    """
    check_tensor(features, "features", 2)
    check_tensor(weight, "weight", 2)
    if weight.shape[0] != features.shape[1]:
        raise NcdError(f"weight must be [d={features.shape[1]}, C], got {tuple(weight.shape)}")
    check_positive(temperature, "temperature")
    if normalize not in ("row", "column"):
        raise NcdError(f"normalize must be 'row' (official code) or 'column' (paper Eq. 13), got {normalize!r}")
    w = l2_normalize(weight, 1 if normalize == "row" else 0)
    return F.softmax(torch.mm(features, w) / temperature, dim=1)
