"""Weighted k-nearest-neighbour classifier on frozen features (NPID-style; METHODS.md 7)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncd.errors import NcdError

__all__ = ["weighted_knn"]


def _as_tensor(x: Any) -> Tensor:
    return x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def weighted_knn(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
    *,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    r"""Weighted kNN accuracy of ``test_features`` against a labelled ``train_features`` bank.

    Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
    (NPID, CVPR 2018), used as the feature-quality monitor by SeLa, CLD, Super-AND/two-stage and
    SCAN's SimCLR stage. For a test feature :math:`f`:

    .. math::
        s_j = \langle f, f_j\rangle,\quad \mathcal{N} = \text{top-}k\ \text{of}\ s,\quad
        \text{score}_c = \sum_{j \in \mathcal{N},\ y_j = c} \exp(s_j / \sigma),\quad
        \hat y = \arg\max_c \text{score}_c

    Features are used as given (they are expected to be unit vectors already; no re-normalisation
    and no max-subtraction in the exponential, as upstream). ``k`` is capped at the size of the
    bank. Classes are ranked by a stable descending sort (ties: lower class id first), so
    ``top1`` uses the argmax and ``top5`` asks whether the label is among the first
    ``min(5, num_classes)`` ranked classes. The test set is processed in chunks of
    ``chunk_size`` rows so memory stays ``O(chunk_size · N_train)``.

    Accepts torch tensors (NumPy arrays also work); computes on ``train_features``' device.
    Returns ``top1`` and ``top5`` (python floats in [0, 1]), ``class_scores`` (``[N_test, C]``,
    the features' dtype) and ``predictions`` (int64 ``[N_test]``).
    """
    train_f = _as_tensor(train_features)
    test_f = _as_tensor(test_features)
    train_y = _as_tensor(train_labels)
    test_y = _as_tensor(test_labels)
    if train_f.dim() != 2 or test_f.dim() != 2 or train_f.shape[1] != test_f.shape[1]:
        raise NcdError(
            f"features must be [N, d] with the same d, got train {tuple(train_f.shape)} and test {tuple(test_f.shape)}"
        )
    if not train_f.is_floating_point() or not test_f.is_floating_point():
        raise NcdError("features must be floating point")
    if train_y.dim() != 1 or train_y.shape[0] != train_f.shape[0]:
        raise NcdError(f"train_labels must be [N_train={train_f.shape[0]}], got {tuple(train_y.shape)}")
    if test_y.dim() != 1 or test_y.shape[0] != test_f.shape[0]:
        raise NcdError(f"test_labels must be [N_test={test_f.shape[0]}], got {tuple(test_y.shape)}")
    if train_y.is_floating_point() or test_y.is_floating_point():
        raise NcdError("labels must be integer class ids")
    num_classes = int(num_classes)
    if num_classes < 1:
        raise NcdError(f"num_classes must be >= 1, got {num_classes}")
    if train_f.shape[0] < 1 or test_f.shape[0] < 1:
        raise NcdError(f"empty feature set: train {train_f.shape[0]}, test {test_f.shape[0]} rows")
    for name, y in (("train_labels", train_y), ("test_labels", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise NcdError(f"{name} must lie in 0..{num_classes - 1}, got [{int(y.min())}, {int(y.max())}]")
    if int(k) < 1:
        raise NcdError(f"k must be >= 1, got {k}")
    if not sigma > 0:
        raise NcdError(f"sigma must be > 0, got {sigma}")
    if int(chunk_size) < 1:
        raise NcdError(f"chunk_size must be >= 1, got {chunk_size}")

    device = train_f.device
    dtype = torch.promote_types(train_f.dtype, test_f.dtype)
    train_f = train_f.to(dtype)
    train_y = train_y.to(device=device, dtype=torch.long)
    test_y = test_y.to(device=device, dtype=torch.long)
    kk = min(int(k), train_f.shape[0])
    ntop = min(5, num_classes)
    n_test = test_f.shape[0]

    scores = torch.zeros(n_test, num_classes, dtype=dtype, device=device)
    with torch.no_grad():
        for s in range(0, n_test, int(chunk_size)):
            q = test_f[s : s + int(chunk_size)].to(device=device, dtype=dtype)
            sim = torch.matmul(q, train_f.t())
            yd, yi = sim.topk(kk, dim=1, largest=True, sorted=True)
            nbr_labels = train_y[yi]
            weights = (yd / sigma).exp()
            scores[s : s + q.shape[0]].scatter_add_(1, nbr_labels, weights)
        ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :ntop]
    predictions = ranked[:, 0].clone()
    top1 = float((predictions == test_y).double().mean())
    top5 = float((ranked == test_y.view(-1, 1)).any(dim=1).double().mean())
    return {"top1": top1, "top5": top5, "class_scores": scores, "predictions": predictions}
