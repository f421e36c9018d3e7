"""Initialisations shared by the memory-bank methods."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["npid_memory_init"]


def npid_memory_init(n: int, d: int) -> Tensor:
    r"""An NPID memory bank (or MoCo queue) of ``n`` rows of dimension ``d``: uniform in
    :math:`[-s, s]`, :math:`s = 1/\sqrt{d/3}` (NPID's ``LinearAverage``, Super-AND's
    ``NonParametricClassifier``, CLD's memory and queue).

    One ``torch.rand(n, d)`` draw from the global generator, then ``· 2s − s``, in the default dtype.
    """
    stdv = 1.0 / math.sqrt(d / 3)
    return torch.rand(int(n), int(d)).mul_(2 * stdv).add_(-stdv)
