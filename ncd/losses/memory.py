"""Memory bank shared by the NPID-style methods (CLD's NPID branch, Super-AND / two-stage)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ncd.errors import NcdError
from ncd.ops.checks import check_index, check_tensor

__all__ = ["memory_bank_update", "check_memory_batch"]


def check_memory_batch(features: Tensor, index: Tensor, memory: Tensor, device: torch.device) -> Tensor:
    """``features`` ``[B, d]`` and ``memory`` ``[N, d]`` floating point with the same ``d``, and ``index``
    B rows of the memory: returns the index as int64 on ``device``; else :class:`NcdError` naming it."""
    check_tensor(features, "features", 2)
    check_tensor(memory, "memory", 2)
    if features.shape[1] != memory.shape[1]:
        raise NcdError(f"features have {features.shape[1]} columns but the memory has {memory.shape[1]}; expected equal")
    return check_index(index, features.shape[0], memory.shape[0], device=device)


@torch.no_grad()
def memory_bank_update(memory: Tensor, features: Tensor, index: Tensor, momentum: float = 0.5, *,
                       inplace: bool = False) -> Tensor:
    r"""Momentum update of the rows ``index`` of an NPID memory bank; returns the new memory.

    .. math:: M[i] \leftarrow \frac{m\,M[i] + (1-m)\,x}{\lVert m\,M[i] + (1-m)\,x \rVert_2}

    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
    (CVPR 2018); the update of CLD's ``LinearAverage`` and of Super-AND's ``NonParametricClassifier``.

    Every row is computed from the memory *before* this call. When ``index`` holds a row more than
    once (two views of one image in one call), the last occurrence wins, which is what the official
    ``index_copy_`` does on the CPU (on the GPU it is unspecified there; here it is always the last).
    ``memory`` ``[N, d]`` is not modified: a new tensor is returned (``inplace=True``: the rows are
    written into ``memory``, which is returned; a training loop's buffer must stay the same tensor);
    ``features`` ``[B, d]`` are detached; ``index`` ``[B]`` int64.
    """
    index = check_memory_batch(features, index, memory, memory.device)
    x = features.detach().to(memory.dtype)
    new_rows = F.normalize(momentum * memory[index] + (1.0 - momentum) * x, dim=1)
    # keep only the last occurrence of each row so the result does not depend on scatter order
    b = index.shape[0]
    pos = torch.arange(b, device=index.device)
    last = torch.full((memory.shape[0],), -1, dtype=torch.long, device=index.device).scatter_reduce(
        0, index, pos, reduce="amax")
    # every occurrence of a row writes the last occurrence's value, so the scatter order cannot
    # matter, and no boolean mask (whose nonzero() would stop the GPU queue) is needed
    out = memory if inplace else memory.clone()
    out.index_copy_(0, index, new_rows[last[index]])
    return out
