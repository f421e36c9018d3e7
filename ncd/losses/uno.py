"""UNO's discovery losses (Fini et al., "A Unified Objective for Novel Class Discovery", ICCV 2021;
official code: DonkeyShot21/UNO, repo state "UNO v2": ``utils/sinkhorn_knopp.py`` and
``Discoverer.training_step`` / ``swapped_prediction`` / ``cross_entropy_loss`` in ``main_discover.py``).

Pure functions: tensors in, tensors out, no state. The arithmetic follows the official code operation by
operation, quirks included (METHODS.md 3.3 and 3.9): Sinkhorn-Knopp exponentiates without subtracting the
maximum, small crops get no targets, and the cross-entropy batch mean runs over all rows (labeled and
unlabeled) for every class entry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ncd.errors import NcdError
from ncd.ops.checks import check_positive as _check_positive
from ncd.ops.checks import check_tensor as _check_tensor
from ncd.ops.checks import check_tensor_pair, value_checks

__all__ = ["sinkhorn_knopp", "swapped_prediction", "uno_loss"]


def _check_count(value: int, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NcdError(f"{name} must be an integer >= {minimum}, got {value!r}")


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, epsilon: float = 0.05, iters: int = 3) -> Tensor:
    r"""Sinkhorn-Knopp soft pseudo-labels (UNO's ``SinkhornKnopp``; Fini et al., ICCV 2021, eq. 4,
    after Caron et al., SwAV, NeurIPS 2020).

    For logits :math:`\ell \in \mathbb{R}^{B\times K}` (cosines in UNO):

    .. math::
        Q = \exp(\ell/\varepsilon)^\top / \textstyle\sum \exp(\ell/\varepsilon)

        \text{repeat } n:\quad Q \leftarrow Q / \mathrm{rowsum}(Q) / K,\quad
        Q \leftarrow Q / \mathrm{colsum}(Q) / B

        \text{return } (B\,Q)^\top

    so every returned row sums to 1 (after at least one iteration) and every column sums to about
    ``B / K`` (the equipartition constraint). As upstream: no max subtraction (safe for cosine logits
    with ε = 0.05, at most e^20), soft assignments (not argmaxed), no gradient. Computed in float32
    (float64 inputs stay float64; half inputs are promoted, as ``exp`` is under fp16 autocast);
    the input is never modified. Returns ``[B, K]``.
    """
    _check_tensor(logits, "logits", 2)
    _check_positive(epsilon, "epsilon")
    _check_count(iters, "iters", 0)
    b, k = logits.shape
    if b < 1 or k < 1:
        raise NcdError(f"sinkhorn_knopp needs a non-empty [B, K] matrix, got {tuple(logits.shape)}")
    x = logits.detach()
    if x.dtype != torch.float64:
        x = x.float()
    q = torch.exp(x / epsilon).t()  # new tensor: in-place ops below never touch the input
    q /= torch.sum(q)
    for _ in range(iters):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def swapped_prediction(logits: Tensor, targets: Tensor, num_large_crops: int = 2, temperature: float = 0.1) -> Tensor:
    r"""UNO's swapped-prediction loss (``Discoverer.swapped_prediction``; Fini et al., ICCV 2021, eq. 3).

    ``logits`` and ``targets`` are ``[V, H, B, C]`` (views, heads, batch, classes); the first
    ``L = num_large_crops`` views are the large crops, the others small crops whose targets are unused.
    Per head :math:`h`:

    .. math::
        \mathcal{L}_h = \frac{1}{L(V-1)} \sum_{v<L} \sum_{u\ne v} \frac{1}{B} \sum_b
            -\sum_c t_{v,h,b,c}\,\log\mathrm{softmax}(\ell_{u,h,b}/T)_c

    Each large view's targets supervise every other view (the other large views and all small crops);
    the batch mean runs over all ``B`` rows. Targets are detached (they are pseudo-labels). Returns the
    loss per head, ``[H]``.
    """
    check_tensor_pair(logits, "logits", targets, "targets", 4, layout="[V, H, B, C]")
    v_all, h, b, c = logits.shape
    _check_count(num_large_crops, "num_large_crops", 1)
    if v_all < 2 or num_large_crops > v_all:
        raise NcdError(
            f"swapped_prediction needs V >= 2 views and num_large_crops <= V, got V={v_all}, "
            f"num_large_crops={num_large_crops}"
        )
    if h < 1 or b < 1 or c < 1:
        raise NcdError(f"logits must be non-empty [V, H, B, C], got {tuple(logits.shape)}")
    _check_positive(temperature, "temperature")
    targets = targets.detach()
    loss = 0
    for view in range(num_large_crops):
        for other_view in range(v_all):
            if other_view == view:
                continue
            preds = F.log_softmax(logits[other_view] / temperature, dim=-1)
            loss = loss + torch.mean(-torch.sum(targets[view] * preds, dim=-1), dim=-1)
    return loss / (num_large_crops * (v_all - 1))


def _targets(logits_lab: Tensor, logits_unlab: Tensor, labels: Tensor, nlc: int, num_large_crops: int,
             epsilon: float, iters: int) -> Tensor:
    """Targets ``[V, H, B, nlc + K]`` as the official ``training_step`` builds them (zeros for small crops)."""
    v_all, h, b, k = logits_unlab.shape
    mask_lab = labels < nlc
    dtype = torch.promote_types(logits_lab.dtype, logits_unlab.dtype)
    targets = torch.zeros(v_all, h, b, nlc + k, dtype=dtype, device=logits_unlab.device)
    targets_lab = F.one_hot(labels[mask_lab], num_classes=nlc).to(dtype)
    has_unlab = bool((~mask_lab).any())
    for v in range(num_large_crops):
        for hh in range(h):
            targets[v, hh, mask_lab, :nlc] = targets_lab
            if has_unlab:
                targets[v, hh, ~mask_lab, nlc:] = sinkhorn_knopp(
                    logits_unlab[v, hh, ~mask_lab], epsilon=epsilon, iters=iters
                ).to(dtype)
    return targets


def _check_uno_inputs(logits_lab: Tensor, logits_unlab: Tensor, logits_unlab_over: Tensor, labels: Tensor,
                      num_labeled_classes: int, num_large_crops: int, temperature: float, epsilon: float,
                      iters: int) -> None:
    """:func:`uno_loss`'s shape, dtype and parameter checks: :class:`NcdError` naming the bad input."""
    _check_tensor(logits_lab, "logits_lab", 3)
    _check_tensor(logits_unlab, "logits_unlab", 4)
    _check_tensor(logits_unlab_over, "logits_unlab_over", 4)
    _check_count(num_labeled_classes, "num_labeled_classes", 1)
    _check_count(num_large_crops, "num_large_crops", 1)
    v_all, b, nlc = logits_lab.shape
    if nlc != num_labeled_classes:
        raise NcdError(
            f"logits_lab must have num_labeled_classes={num_labeled_classes} columns, "
            f"got shape {tuple(logits_lab.shape)}"
        )
    v_u, h, b_u, nuc = logits_unlab.shape
    if (v_u, b_u) != (v_all, b) or h < 1 or nuc < 1:
        raise NcdError(
            f"logits_unlab must be [V={v_all}, H, B={b}, nuc] with H, nuc >= 1, got {tuple(logits_unlab.shape)}"
        )
    v_o, h_o, b_o, nuo = logits_unlab_over.shape
    if (v_o, h_o, b_o) != (v_all, h, b) or nuo < 1:
        raise NcdError(
            f"logits_unlab_over must be [V={v_all}, H={h}, B={b}, nuc*f], got {tuple(logits_unlab_over.shape)}"
        )
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != b:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise NcdError(f"labels must be a 1-d tensor of length B={b}, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise NcdError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if b < 1:
        raise NcdError("uno_loss needs a non-empty batch")
    if value_checks() and bool((labels < 0).any()):
        raise NcdError("labels must be >= 0")
    if v_all < 2 or num_large_crops > v_all:
        raise NcdError(
            f"uno_loss needs V >= 2 views and num_large_crops <= V, got V={v_all}, "
            f"num_large_crops={num_large_crops}"
        )
    _check_positive(temperature, "temperature")
    _check_positive(epsilon, "epsilon")
    _check_count(iters, "iters", 0)


def uno_loss(
    logits_lab: Tensor,
    logits_unlab: Tensor,
    logits_unlab_over: Tensor,
    labels: Tensor,
    num_labeled_classes: int,
    num_large_crops: int = 2,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iters: int = 3,
) -> dict[str, Tensor]:
    r"""UNO's whole discovery objective for one training step (``Discoverer.training_step``, UNO v2;
    Fini et al., ICCV 2021, sec. 3).

    Inputs are the head outputs for ``V`` views (large crops first): ``logits_lab [V, B, nlc]``,
    ``logits_unlab [V, H, B, nuc]``, ``logits_unlab_over [V, H, B, nuc·f]``, and ``labels [B]``
    (rows with ``label < nlc`` are labeled, all others unlabeled). Per view and head the logits are
    ``[logits_lab ‖ logits_unlab]`` (labeled logits in front, shared by all heads). Targets, large crops
    only: labeled rows get ``one_hot(label)`` over the first ``nlc`` entries and zeros after; unlabeled
    rows get zeros first and :func:`sinkhorn_knopp` of that view's and head's unlabeled-row logits after
    (run per large view and per head on the unlabeled rows of the batch only). The same is built for the
    over-clustering heads. With :func:`swapped_prediction` per head:

    .. math::
        \text{loss} = \tfrac12\big(\mathrm{mean}_h\,\mathcal{L}^{\text{cluster}}_h
            + \mathrm{mean}_h\,\mathcal{L}^{\text{over}}_h\big)

    Returns a dict: ``loss`` (back-propagated), ``loss_cluster`` and ``loss_overcluster`` (means over
    heads, scalars) and ``loss_per_head`` ``[H]``: the detached per-head *cluster* loss, which is what the
    official code adds to its ``loss_per_head`` buffer to pick the best head (METHODS.md 3.3).
    """
    _check_uno_inputs(logits_lab, logits_unlab, logits_unlab_over, labels, num_labeled_classes, num_large_crops,
                      temperature, epsilon, iters)
    nlc, h = num_labeled_classes, logits_unlab.shape[1]
    labels = labels.to(logits_lab.device)

    lab = logits_lab.unsqueeze(1).expand(-1, h, -1, -1)
    logits = torch.cat([lab, logits_unlab], dim=-1)
    logits_over = torch.cat([lab, logits_unlab_over], dim=-1)
    with torch.no_grad():
        targets = _targets(logits_lab, logits_unlab, labels, nlc, num_large_crops, epsilon, iters)
        targets_over = _targets(logits_lab, logits_unlab_over, labels, nlc, num_large_crops, epsilon, iters)

    loss_cluster_h = swapped_prediction(logits, targets, num_large_crops, temperature)
    loss_overcluster_h = swapped_prediction(logits_over, targets_over, num_large_crops, temperature)
    loss_cluster = loss_cluster_h.mean()
    loss_overcluster = loss_overcluster_h.mean()
    return {
        "loss": (loss_cluster + loss_overcluster) / 2,
        "loss_cluster": loss_cluster,
        "loss_overcluster": loss_overcluster,
        "loss_per_head": loss_cluster_h.detach().clone(),
    }
