"""Memory bank shared by the NPID-style methods (CLD's NPID branch, Super-AND / two-stage)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ncd.errors import NcdError
from ncd.losses._checks import check_tensor

__all__ = ["memory_bank_update"]


@torch.no_grad()
def memory_bank_update(memory: Tensor, features: Tensor, index: Tensor, momentum: float = 0.5) -> Tensor:
    r"""Momentum update of the rows ``index`` of an NPID memory bank; returns the new memory.

    .. math:: M[i] \leftarrow \frac{m\,M[i] + (1-m)\,x}{\lVert m\,M[i] + (1-m)\,x \rVert_2}

    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
    (CVPR 2018); the update of CLD's ``LinearAverage`` and of Super-AND's ``NonParametricClassifier``.

    Every row is computed from the memory *before* this call. When ``index`` holds a row more than
    once (two views of one image in one call), the last occurrence wins, which is what the official
    ``index_copy_`` does on the CPU (on the GPU it is unspecified there; here it is always the last).
    ``memory`` ``[N, d]`` is not modified: a new tensor is returned; ``features`` ``[B, d]`` are
    detached; ``index`` ``[B]`` int64.
    """
    check_tensor(memory, "memory", 2)
    check_tensor(features, "features", 2)
    if features.shape[1] != memory.shape[1]:
        raise NcdError(f"features have {features.shape[1]} columns but the memory has {memory.shape[1]}; expected equal")
    index = torch.as_tensor(index, device=memory.device)
    if index.dim() != 1 or index.shape[0] != features.shape[0] or index.dtype not in (torch.int64, torch.int32):
        raise NcdError(f"index must be an integer vector of length {features.shape[0]}, got {tuple(index.shape)} {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= memory.shape[0]):
        raise NcdError(f"index must lie in 0..{memory.shape[0] - 1}, got [{int(index.min())}, {int(index.max())}]")
    index = index.long()
    x = features.detach().to(memory.dtype)
    new_rows = F.normalize(momentum * memory[index] + (1.0 - momentum) * x, dim=1)
    # keep only the last occurrence of each row so the result does not depend on scatter order
    b = index.shape[0]
    pos = torch.arange(b, device=index.device)
    last = torch.full((memory.shape[0],), -1, dtype=torch.long, device=index.device).scatter_reduce(
        0, index, pos, reduce="amax")
    keep = last[index] == pos
    out = memory.clone()
    out[index[keep]] = new_rows[keep]
    return out
