"""SCAN's three training losses (Van Gansbeke et al., "SCAN: Learning to Classify Images without
Labels", ECCV 2020; official code: wvangansbeke/Unsupervised-Classification, ``losses/losses.py``).

Pure functions: tensors in, tensors out, differentiable, no state. The arithmetic follows the
official modules operation by operation (same float32 rounding, same clamps), so the values agree
with ``SimCLRLoss``, ``SCANLoss`` and ``ConfidenceBasedCE`` to the last bits on the same device.
See METHODS.md 1.3 and 1.10 for the formulas and the quirks kept here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ncd.errors import NcdError
from ncd.ops.checks import check_tensor as _check_tensor
from ncd.ops.checks import check_tensor_pair

__all__ = ["simclr_loss", "scan_loss", "confidence_ce", "EmptyMaskError", "EPS"]

#: Clamp applied to the batch-mean prediction before the entropy (``losses.EPS`` upstream).
EPS = 1e-8


class EmptyMaskError(NcdError, ValueError):
    """No sample passed the confidence threshold in :func:`confidence_ce`.

    A ``ValueError`` with the official message (so code written against the official
    ``MaskedCrossEntropyLoss`` keeps working) and an :class:`~ncd.errors.NcdError`.
    """


def simclr_loss(features: Tensor, temperature: float = 0.1) -> Tensor:
    r"""SimCLR contrastive loss in SCAN's one-directional form (``SimCLRLoss``).

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations"
    (ICML 2020), as implemented for the pretext stage of SCAN (ECCV 2020).

    ``features`` is ``[b, 2, d]`` with L2-normalised rows (view 0 and view 1 of each image).
    With :math:`a_i = z_{i,0}`, :math:`Z = [z_{:,0}; z_{:,1}] \in \mathbb{R}^{2b\times d}` and
    :math:`s_{ij} = a_i \cdot Z_j / T`:

    .. math::
        L = -\frac{1}{b}\sum_{i=1}^{b}\Big[s_{i,b+i} - \log\sum_{j\ne i} e^{s_{ij}}\Big]

    Only the ``b`` first-view rows are anchors; the self-similarity :math:`s_{ii}` is removed from
    the denominator; the positive is the same image's second view and the other ``2b-2`` vectors
    are negatives. As upstream, the row maximum (self-similarity included, detached) is subtracted
    before the exponential; this leaves the value unchanged. Returns a scalar tensor.
    """
    _check_tensor(features, "features", 3)
    b, n, _ = features.shape
    if n != 2:
        raise NcdError(f"features must have shape [b, 2, d] (two views), got {tuple(features.shape)}")
    if b < 1:
        raise NcdError("features must contain at least one image")
    if not temperature > 0:
        raise NcdError(f"temperature must be > 0, got {temperature}")
    device = features.device
    mask = torch.eye(b, dtype=features.dtype, device=device)

    contrast_features = torch.cat(torch.unbind(features, dim=1), dim=0)  # [2b, d]
    anchor = features[:, 0]  # [b, d]

    dot_product = torch.matmul(anchor, contrast_features.T) / temperature
    logits_max, _ = torch.max(dot_product, dim=1, keepdim=True)
    logits = dot_product - logits_max.detach()

    mask = mask.repeat(1, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(b, device=device).view(-1, 1), 0)
    mask = mask * logits_mask

    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def _batch_entropy(probs_mean: Tensor) -> Tensor:
    """H(max(p, 1e-8)) of one distribution, natural log (upstream ``entropy(x, True)``)."""
    x_ = torch.clamp(probs_mean, min=EPS)
    return -(x_ * torch.log(x_)).sum()


def scan_loss(anchor_logits: Tensor, neighbor_logits: Tensor, entropy_weight: float = 5.0) -> tuple[Tensor, Tensor, Tensor]:
    r"""SCAN clustering loss (``SCANLoss``; Van Gansbeke et al., ECCV 2020, eq. 2).

    Anchor logits ``x`` and neighbour logits ``y``, both ``[b, K]``;
    :math:`p_i = \mathrm{softmax}(x_i)`, :math:`q_i = \mathrm{softmax}(y_i)`:

    .. math::
        \text{consistency} = \frac{1}{b}\sum_i -\max(\log\langle p_i, q_i\rangle, -100)

        \text{entropy} = H(\max(\bar p, 10^{-8})),\quad \bar p = \frac{1}{b}\sum_i p_i

        \text{total} = \text{consistency} - \lambda_e\,\text{entropy}

    The consistency term is ``F.binary_cross_entropy(<p_i, q_i>, 1)`` as upstream, hence PyTorch's
    −100 clamp on the log. The entropy (natural log, positive) is that of the batch-mean *anchor*
    prediction. Gradients flow through both branches. The configs use ``entropy_weight = 5``
    (the upstream class default is 2). Returns ``(total, consistency, entropy)``, scalar tensors.

    The only difference from upstream: the similarity is clamped into [0, 1] before the BCE, so a
    float rounding of ⟨p, q⟩ to just above 1 gives loss 0 instead of PyTorch's range error; at
    every value the official code accepts, value and gradient are unchanged.
    """
    check_tensor_pair(anchor_logits, "anchor_logits", neighbor_logits, "neighbor_logits", 2)
    b, n = anchor_logits.shape
    if b < 1 or n < 1:
        raise NcdError(f"scan_loss needs a non-empty [b, K] batch, got {tuple(anchor_logits.shape)}")
    anchors_prob = F.softmax(anchor_logits, dim=1)
    positives_prob = F.softmax(neighbor_logits, dim=1)

    similarity = torch.bmm(anchors_prob.view(b, 1, n), positives_prob.view(b, n, 1)).squeeze()
    similarity = torch.clamp(similarity, 0.0, 1.0)
    ones = torch.ones_like(similarity)
    consistency_loss = F.binary_cross_entropy(similarity, ones)

    entropy_loss = _batch_entropy(torch.mean(anchors_prob, 0))
    total_loss = consistency_loss - entropy_weight * entropy_loss
    return total_loss, consistency_loss, entropy_loss


_ON_EMPTY = ("raise", "zero")


def confidence_ce(
    weak_logits: Tensor,
    strong_logits: Tensor,
    threshold: float = 0.99,
    class_balance: bool = True,
    *,
    on_empty: str = "raise",
) -> Tensor:
    r"""SCAN self-labeling loss (``ConfidenceBasedCE``; Van Gansbeke et al., ECCV 2020, sec. 3.3).

    Weak-view logits ``w`` and strong-view logits ``s``, both ``[b, K]``. The weak branch is a
    constant (detached; upstream computes it under ``no_grad``):
    :math:`\hat y_i = \arg\max \mathrm{softmax}(w_i)`, :math:`m_i = [\max \mathrm{softmax}(w_i) >
    \text{threshold}]` (strict). With :math:`n = \sum_i m_i` and :math:`n_c` the number of
    selected samples with :math:`\hat y = c`, class weights :math:`\alpha_c = 1/(n_c/n)` for the
    classes present among the selected samples and 1 for the others:

    .. math::
        L_\text{balanced} = \frac{\sum_{i: m_i} \alpha_{\hat y_i}\,\mathrm{CE}(s_i, \hat y_i)}
                                 {\sum_{i: m_i} \alpha_{\hat y_i}},\qquad
        L_\text{plain} = \operatorname{mean}_{i: m_i} \mathrm{CE}(s_i, \hat y_i)

    (``F.cross_entropy(s[m], ŷ[m], weight=α, reduction='mean')`` as upstream.)

    When no sample passes the threshold, upstream raises ``ValueError('Mask in
    MaskedCrossEntropyLoss is all zeros.')``; that stays the default (``on_empty="raise"``, raised
    as :class:`EmptyMaskError`, a ``ValueError``). ``on_empty="zero"`` instead returns a zero that
    is still connected to ``strong_logits`` in the autograd graph (zero gradient), so a training
    loop can skip the batch.
    """
    if on_empty not in _ON_EMPTY:
        raise NcdError(f"on_empty must be one of {_ON_EMPTY}, got {on_empty!r}")
    check_tensor_pair(weak_logits, "weak_logits", strong_logits, "strong_logits", 2)
    weak_prob = F.softmax(weak_logits.detach(), dim=1)
    max_prob, target = torch.max(weak_prob, dim=1)
    mask = max_prob > threshold
    b, c = weak_prob.shape
    target = target.to(strong_logits.device)
    mask = mask.to(strong_logits.device)

    if not bool(mask.any()):
        if on_empty == "raise":
            raise EmptyMaskError("Mask in MaskedCrossEntropyLoss is all zeros.")
        # sum over an empty slice: exactly 0, no NaN from inf logits, still has a grad_fn
        return strong_logits[:0].sum()

    target_masked = torch.masked_select(target, mask)
    n = target_masked.size(0)
    if class_balance:
        idx, counts = torch.unique(target_masked, return_counts=True)
        freq = 1 / (counts.to(strong_logits.dtype) / n)
        weight = torch.ones(c, dtype=strong_logits.dtype, device=strong_logits.device)
        weight[idx] = freq
    else:
        weight = None

    inputs = torch.masked_select(strong_logits, mask.view(b, 1)).view(n, c)
    return F.cross_entropy(inputs, target_masked, weight=weight, reduction="mean")
