"""CLD (Wang, Liu, Yu, "Unsupervised Feature Learning by Cross-Level Instance-Group Discrimination",
CVPR 2021; METHODS.md 5): the group branch (batch k-means, cross-level loss) and the two instance
branches it is added to (NPID's memory bank, MoCo's queue).

All functions are pure: tensors in, tensors out; memories and queues are returned, never modified
(except with ``enqueue(..., inplace=True)``, for a training loop's buffer).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ncd.errors import NcdError
from ncd.losses.memory import check_memory_batch
from ncd.ops.checks import check_positive, check_tensor, check_tensor_pair

__all__ = ["batch_kmeans", "cld_loss", "npid_loss", "moco_logits", "enqueue"]


def _positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise NcdError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def batch_kmeans(x: Tensor, num_clusters: int, iters: int = 5) -> tuple[Tensor, Tensor]:
    r"""k-means on the rows of one batch, as CLD's ``spectral_clustering.KMeans``.

    Centroids start as the first ``K`` rows (no k-means++); then ``iters`` rounds of
    assignment by squared Euclidean distance :math:`\lVert x_i - c_k\rVert^2` (the lowest
    index wins ties) and plain means :math:`c_k = \frac{1}{|S_k|}\sum_{i \in S_k} x_i`. An
    empty cluster's centroid is the zero vector; centroids are never re-normalised. With fewer
    rows than clusters (``B < K``) the first assignment sees the ``B`` rows only, so every row
    is its own cluster and the remaining ``K - B`` centroids are zero (CLD's ImageNet case,
    METHODS.md 5.4).

    ``x`` ``[B, d]``. Returns ``(labels, centroids)``: the last assignment (int64 ``[B]``) and
    the centroids recomputed from it (``[K, d]``, ``x``'s dtype), differentiable means of ``x``.
    """
    check_tensor(x, "x", 2)
    k = _positive_int(num_clusters, "num_clusters")
    iters = _positive_int(iters, "iters")
    b, d = x.shape
    if b < 1:
        raise NcdError("x must have at least one row, got an empty batch")
    c = x[:k]  # B < K: only B centroids take part in the first assignment
    labels = x.new_zeros(b, dtype=torch.long)
    for _ in range(iters):
        # the distance and argmin see the centroids' values only; the gradient flows through the
        # final mean below, as in the official code where argmin cuts the graph
        dist = ((x.detach()[:, None, :] - c.detach()[None, :, :]) ** 2).sum(-1)
        labels = dist.argmin(dim=1)
        counts = torch.bincount(labels, minlength=k).clamp_(min=1).to(x.dtype)
        c = x.new_zeros(k, d).index_add(0, labels, x) / counts[:, None]
    return labels, c


def cld_loss(f1: Tensor, f2: Tensor, num_clusters: int, temperature: float = 0.2, iters: int = 5, *,
             detach_centroids: bool = False) -> dict[str, Tensor]:
    r"""CLD's cross-level instance-group loss between the group features of two views.

    Each view is clustered on its own with :func:`batch_kmeans` (labels :math:`\Gamma^v`,
    centroids :math:`C^v`); each sample's feature of one view must pick, among the other view's
    centroids, the cluster its other view fell into:

    .. math::
        L = \tfrac12\,\big[\mathrm{CE}(G^1 C^{2\top}/\tau,\ \Gamma^2) +
                           \mathrm{CE}(G^2 C^{1\top}/\tau,\ \Gamma^1)\big]

    with batch-mean cross-entropy (Wang, Liu, Yu, CVPR 2021, Eq. 5; METHODS.md 5.4). Gradients
    reach the features directly and through the centroids (the official behaviour);
    ``detach_centroids=True`` treats the centroids as constants instead.

    ``f1``, ``f2`` ``[B, d]`` (row i = the same image; L2-normalised group features). Returns
    ``loss``, ``labels1``, ``labels2``, ``centroids1``, ``centroids2`` and ``group_acc``: the
    fraction of rows whose most similar view-2 centroid is their view-2 cluster (the official
    "group acc", as a fraction instead of percent).
    """
    check_tensor_pair(f1, "f1", f2, "f2", 2, "[B, d]")
    tau = check_positive(temperature, "temperature")
    labels1, c1 = batch_kmeans(f1, num_clusters, iters)
    labels2, c2 = batch_kmeans(f2, num_clusters, iters)
    if detach_centroids:
        c1, c2 = c1.detach(), c2.detach()
    logits1 = f1 @ c2.t() / tau
    logits2 = f2 @ c1.t() / tau
    loss = 0.5 * (F.cross_entropy(logits1, labels2) + F.cross_entropy(logits2, labels1))
    group_acc = (logits1.detach().argmax(dim=1) == labels2).to(f1.dtype).mean()
    return {"loss": loss, "labels1": labels1, "labels2": labels2, "centroids1": c1, "centroids2": c2,
            "group_acc": group_acc}


def npid_loss(features: Tensor, index: Tensor, memory: Tensor, temperature: float = 0.1) -> Tensor:
    r"""NPID's instance loss with the full softmax over all memory rows (CLD's ``LinearAverage``).

    .. math:: L = \frac1B \sum_i -\log \frac{\exp(v_i\cdot M_{y_i}/T)}{\sum_{j=1}^{N} \exp(v_i\cdot M_j/T)}

    with :math:`y_i` = ``index[i]`` (the sample's dataset index as its class) and the memory a
    constant for the gradient (Wu et al., CVPR 2018; CLD's NPID branch, METHODS.md 5.3). The
    memory is not updated here: that is :func:`ncd.losses.memory_bank_update`, called after the
    loss. With two views the loss is the mean of both CEs, both computed on the memory before
    either update, and the memory is then updated with view 2, then view 1 (the official order).

    The official op (``LinearAverageOp``) updates the memory in place inside its backward: under
    torch 1.7, view 1's gradient was therefore computed against the rows view 2 had already
    updated, while its forward had used the old rows; torch 2 rejects that op (the in-place
    update of a tensor saved for backward raises an error). Here both views' gradients use the
    pre-update memory, which is what the forward computed with.

    ``features`` ``[B, d]`` (L2-normalised), ``index`` int64 ``[B]``, ``memory`` ``[N, d]``.
    Returns the batch-mean loss (a scalar).
    """
    index = check_memory_batch(features, index, memory, features.device)
    tau = check_positive(temperature, "temperature")
    logits = features @ memory.detach().to(features.dtype).t() / tau
    return F.cross_entropy(logits, index)


def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.07) -> Tensor:
    r"""MoCo's InfoNCE logits: positive first, then the queue's keys (the loss is CE to class 0).

    .. math:: \ell_i = [\,q_i\cdot k_i,\ q_i\cdot Q_1,\ \dots,\ q_i\cdot Q_{|Q|}\,] / T

    He et al., CVPR 2020 (CLD's ``MemoryMoCo`` on CIFAR, ``builder.MoCo`` on ImageNet;
    METHODS.md 5.3). Keys and queue are constants for the gradient. ``q``, ``k`` ``[B, d]``,
    ``queue`` ``[Q, d]`` (one key per row). Returns ``[B, 1 + Q]``.
    """
    check_tensor_pair(q, "q", k, "k", 2, "[B, d]")
    check_tensor(queue, "queue", 2)
    if queue.shape[1] != q.shape[1]:
        raise NcdError(f"queue has {queue.shape[1]} columns but q has {q.shape[1]}; expected the queue as [Q, d]")
    tau = check_positive(temperature, "temperature")
    k = k.detach()
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.detach().to(q.dtype).t()
    return torch.cat([pos, neg], dim=1) / tau


def enqueue(queue: Tensor, keys: Tensor, ptr: int, *, inplace: bool = False) -> tuple[Tensor, int]:
    r"""Write ``keys`` into the ring buffer ``queue`` at ``ptr``: rows
    :math:`(\mathrm{ptr} + j) \bmod Q` get key :math:`j`; returns ``(queue, (ptr + B) mod Q)``.

    MoCo's dequeue-and-enqueue (CLD's ``MemoryMoCo``), wrapping around the end of the queue.
    ``queue`` ``[Q, d]`` is not modified (a new tensor is returned; ``inplace=True``: the keys are
    written into ``queue``, which is returned); ``keys`` ``[B, d]`` with ``B <= Q`` are detached;
    ``ptr`` in ``0..Q-1`` (an int, or a one-element tensor, which costs a copy to the host).
    """
    check_tensor(queue, "queue", 2)
    check_tensor(keys, "keys", 2)
    size, d = queue.shape
    if keys.shape[1] != d:
        raise NcdError(f"keys have {keys.shape[1]} columns but the queue has {d}; expected equal")
    if keys.shape[0] > size:
        raise NcdError(f"{keys.shape[0]} keys do not fit a queue of {size}; expected at most {size} keys per call")
    ptr = int(ptr.item() if isinstance(ptr, Tensor) else ptr)
    if not 0 <= ptr < size:
        raise NcdError(f"ptr must lie in 0..{size - 1}, got {ptr}")
    rows = (torch.arange(keys.shape[0], device=queue.device) + ptr) % size
    keys = keys.detach().to(device=queue.device, dtype=queue.dtype)
    out = queue.index_copy_(0, rows, keys) if inplace else queue.index_copy(0, rows, keys)
    return out, (ptr + keys.shape[0]) % size
