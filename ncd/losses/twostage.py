"""The two-stage classifier's losses (Han, Park, Park, Kim, Cha, "Mitigating Embedding and Class
Assignment Mismatch in Unsupervised Image Classification", ECCV 2020; official code
dscig/TwoStageUC, ``lib/criterion.py`` and ``lib/ans_discovery.py``; METHODS.md 6.3, 6.4).

Stage 1 is Super-AND (Han et al., "Unsupervised Image Classification via Super-AND", ICCVW 2019):
:func:`anchor_neighbourhoods` and :func:`super_and_loss`. Stage 2: :func:`iic_loss`,
:func:`cp_loss` and :func:`twostage_loss`. Pure functions; the arithmetic follows the official
modules operation by operation (the same exponentials without max-subtraction, the same clamps).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.nn import functional as F

from ncd.errors import NcdError
from ncd.ops.checks import check_index, check_positive, check_tensor, check_tensor_pair
from ncd.ops.normalized import l2_normalize, normalized_fc

__all__ = ["anchor_neighbourhoods", "super_and_loss", "iic_loss", "cp_loss", "twostage_loss", "IIC_EPS"]

#: Clamp of the joint and marginals in :func:`iic_loss` (``sys.float_info.epsilon`` upstream).
IIC_EPS = sys.float_info.epsilon


@torch.no_grad()
def anchor_neighbourhoods(memory: Tensor, round: int, select_rate: float = 0.25, ans_size: int = 1,
                          temperature: float = 0.1, *, chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    r"""Super-AND's anchor-neighbourhood discovery (``ANsDiscovery.update``) before a round.

    For every memory row :math:`M_i` (``memory`` ``[N, d]``): :math:`p_i = \mathrm{softmax}(M_i M^\top / T)`
    over all N rows, self included, and its entropy :math:`H_i = -\sum_j p_{ij} \log p_{ij}`
    (natural log). The :math:`\lfloor N \cdot \text{select\_rate} \cdot \text{round}\rfloor` rows with
    the lowest entropy are the anchors (capped at N; round 0 has none), in ascending entropy; each
    anchor's neighbourhood is its ``ans_size`` most similar other rows by :math:`M_a \cdot M_j`
    (self excluded), most similar first.

    Ties are broken towards the lower row index, in the entropy ranking and among equally similar
    neighbours (the official ``topk`` leaves their order unspecified; it also excludes the anchor
    by setting its own similarity to −1, which here is −∞ so that self can never be chosen). The
    entropy is computed as :math:`-\sum p \log\mathrm{softmax}`, equal to the official
    :math:`-\sum p \log p` wherever that is finite.

    Returns ``(anchors [A] int64, neighbours [A, ans_size] int64, entropy [N])`` on the memory's
    device; the entropy is returned in every round.
    """
    check_tensor(memory, "memory", 2)
    n = memory.shape[0]
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise NcdError(f"round must be an integer >= 0, got {round!r}")
    if not 0.0 <= float(select_rate) <= 1.0:
        raise NcdError(f"select_rate must lie in [0, 1], got {select_rate}")
    if not 1 <= int(ans_size) <= n - 1:
        raise NcdError(f"ans_size must lie in 1..{n - 1} (other rows of a {n}-row memory), got {ans_size}")
    check_positive(temperature, "temperature")
    ans_size = int(ans_size)
    entropy = torch.empty(n, dtype=memory.dtype, device=memory.device)
    for s in range(0, n, chunk_size):
        logits = torch.mm(memory[s:s + chunk_size], memory.t()) / temperature
        entropy[s:s + chunk_size] = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1)
    num = min(n, int(n * float(select_rate) * round))
    anchors = torch.sort(entropy, stable=True).indices[:num]
    neighbours = torch.empty(num, ans_size, dtype=torch.long, device=memory.device)
    for s in range(0, num, chunk_size):
        a = anchors[s:s + chunk_size]
        sims = torch.mm(memory[a], memory.t())
        sims.scatter_(1, a.view(-1, 1), float("-inf"))
        neighbours[s:s + chunk_size] = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :ans_size]
    return anchors, neighbours, entropy


def _batch_instance_loss(x: Tensor, temperature: float, neg_m: float) -> Tensor:
    """The official ``Criterion`` (batch-level augmentation invariance), on rows as given."""
    n = x.shape[0]
    half = n // 2
    reordered = torch.cat([x[half:], x[:half]], 0).detach()
    pos = ((x * reordered).sum(1) / temperature).exp()
    off_diag = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)
    all_prob = (torch.mm(x, x.t().detach()) / temperature).exp() * off_diag
    if neg_m == 1:
        all_div = all_prob.sum(1)
    else:
        all_div = (all_prob.sum(1) - pos) * neg_m + pos  # the positive keeps weight 1
    p_pos = pos / all_div
    # log(1 - e_ij / D_i) over every j (0 on the diagonal), minus the positive's own term
    ln_neg = (1.0 - all_prob / all_div.view(-1, 1)).log().sum(1) - (1.0 - p_pos).log()
    return -(p_pos.log().sum(0) + ln_neg.sum(0) * neg_m) / n


def _check_views(x: Tensor, name: str) -> None:
    check_tensor(x, name, 2)
    if x.shape[0] < 4 or x.shape[0] % 2:
        raise NcdError(f"{name} must hold an even number >= 4 of rows (view 1 rows, then view 2 rows of at "
                       "least two images), "
                       f"got shape {tuple(x.shape)}")


def cp_loss(x: Tensor, temperature: float = 0.1, neg_m: float = 1.0) -> Tensor:
    r"""Consistency-preserving loss :math:`L_{cp}` (stage 2; Super-AND's augmentation loss).

    Han et al., ECCV 2020, Eq. 12 (and Eq. 3 of Super-AND). ``x`` ``[2B, d]``: rows ``0..B-1`` are
    view 1, rows ``B..2B-1`` view 2 of the same images; :math:`\pi(i)` is the other view of row i.
    With :math:`e_{ij} = \exp(x_i \cdot \bar x_j / T)` for :math:`j \ne i` (:math:`\bar x`:
    detached, the official code's second operand) and
    :math:`D_i = \sum_{j \ne \pi(i)} m\,e_{ij} + e_{i\pi(i)}` (:math:`m` = ``neg_m``; for
    :math:`m = 1` the plain row sum):

    .. math::
        L = -\frac{1}{2B}\sum_i \Big[\log\frac{e_{i\pi(i)}}{D_i}
            + m \sum_{j \ne i, \pi(i)} \log\Big(1 - \frac{e_{ij}}{D_i}\Big)\Big]

    Rows are used as given (the network's outputs are already unit vectors). With ``neg_m`` < 1 a
    dominant negative can exceed :math:`D_i` and its log is undefined (NaN), as upstream. Needs
    at least two images (a lone pair has no negative). Returns a scalar.
    """
    _check_views(x, "x")
    check_positive(temperature, "temperature")
    check_positive(neg_m, "neg_m")
    return _batch_instance_loss(x, float(temperature), float(neg_m))


def super_and_loss(features: Tensor, index: Tensor, memory: Tensor, anchors: Tensor, neighbours: Tensor,
                   ue_weight: float = 0.0, npc_temperature: float = 0.1, batch_temperature: float = 0.1,
                   neg_m: float = 1.0) -> dict[str, Tensor]:
    r"""Super-AND's stage-1 objective :math:`L = L_{AND} + L_{AUG} + w\,L_{UE}` (``Criterion_SAND`` + ``UELoss``).

    Han et al., ECCV 2020, Eqs. 1–3 (Super-AND, ICCVW 2019). ``features`` ``[2B, d]``: view-1 rows
    then view-2 rows of the B images ``index`` ``[B]`` (their rows in the ``memory`` ``[N, d]``).
    The memory is a constant for the gradient. With the NPC logits
    :math:`s_r = f_r M^\top / T_{npc}` ``[2B, N]`` and :math:`p_r = \mathrm{softmax}(s_r)`:

    * :math:`L_{AND} = -\frac{1}{2B}\sum_r \log\big(p_{r,y_r} + [y_r \in \mathcal{A}]
      \sum_{j \in \Omega(y_r)} p_{r,j}\big)` — ``anchors`` :math:`\mathcal{A}` ``[A]`` with
      ``neighbours`` :math:`\Omega` ``[A, k]`` (row a belongs to ``anchors[a]``);
    * :math:`L_{AUG}` = :func:`cp_loss` of the L2-normalised NPC logits (N-dimensional similarity
      profiles, the official code's choice, second operand detached), temperature
      ``batch_temperature``, ``neg_m``;
    * :math:`L_{UE} = -\frac{1}{2B}\sum_r \sum_j q_{rj} \log q_{rj}`, :math:`q_r` = softmax of
      :math:`s_r` with the own logit :math:`s_{r,y_r}` set to −10 (super-AND issue #1).

    Returns ``loss`` (back-propagated), ``loss_and``, ``loss_aug`` and ``loss_ue`` (always
    computed; it enters ``loss`` with weight ``ue_weight``).
    """
    _check_views(features, "features")
    check_tensor(memory, "memory", 2)
    if memory.shape[1] != features.shape[1]:
        raise NcdError(f"memory has {memory.shape[1]} columns but features have {features.shape[1]}; expected equal")
    n_mem = memory.shape[0]
    b = features.shape[0] // 2
    index = check_index(index, b, n_mem, "index", features.device)
    anchors = torch.as_tensor(anchors, device=features.device)
    neighbours = torch.as_tensor(neighbours, device=features.device)
    if anchors.dim() != 1 or neighbours.dim() != 2 or neighbours.shape[0] != anchors.shape[0]:
        raise NcdError(f"anchors must be [A] and neighbours [A, k], got {tuple(anchors.shape)} and "
                       f"{tuple(neighbours.shape)}")
    anchors = check_index(anchors, anchors.shape[0], n_mem, "anchors", features.device)
    if neighbours.numel():
        check_index(neighbours.reshape(-1), neighbours.numel(), n_mem, "neighbours", features.device)
    neighbours = neighbours.long()
    for name, v in (("npc_temperature", npc_temperature), ("batch_temperature", batch_temperature), ("neg_m", neg_m)):
        check_positive(v, name)
    if not ue_weight >= 0:
        raise NcdError(f"ue_weight must be >= 0, got {ue_weight}")

    logits = torch.mm(features, memory.detach().t().to(features.dtype)) / npc_temperature
    y = torch.cat([index, index])
    position = torch.full((n_mem,), -1, dtype=torch.long, device=features.device)
    position[anchors] = torch.arange(anchors.shape[0], device=features.device)
    pos = position[y]
    preds = F.softmax(logits, 1)
    p = preds.gather(1, y.view(-1, 1)).view(-1)
    is_anchor = pos >= 0
    if bool(is_anchor.any()):
        nb = neighbours[pos[is_anchor]]
        p = p.clone()
        p[is_anchor] = p[is_anchor] + preds[is_anchor].gather(1, nb).sum(1)
    loss_and = -p.log().sum() / (2 * b)

    loss_aug = _batch_instance_loss(l2_normalize(logits), float(batch_temperature), float(neg_m))

    masked = logits.scatter(1, y.view(-1, 1), -10.0)
    loss_ue = -(F.softmax(masked, 1) * F.log_softmax(masked, 1)).sum() / (2 * b)
    loss = loss_and + loss_aug + float(ue_weight) * loss_ue
    return {"loss": loss, "loss_and": loss_and, "loss_aug": loss_aug, "loss_ue": loss_ue}


def iic_loss(p1: Tensor, p2: Tensor) -> Tensor:
    r"""Negative mutual information of two views' soft assignments (IIC's ``IID_loss``).

    Ji, Henriques, Vedaldi, "Invariant Information Clustering", ICCV 2019; stage 2's class-assignment
    loss (Han et al., ECCV 2020, Eq. 11). ``p1``, ``p2`` ``[B, C]`` (rows are distributions):
    :math:`P = \sum_b p^1_b (p^2_b)^\top`, symmetrised :math:`(P + P^\top)/2`, normalised to sum 1;
    marginals :math:`P_c` (row sums) and :math:`P_{c'}` (column sums) taken before the clamp;
    then every entry of :math:`P`, :math:`P_c`, :math:`P_{c'}` below the float64 machine epsilon
    (2.2e-16) is set to it (clamped entries get no gradient), and

    .. math:: L = -\sum_{c,c'} P_{cc'} \big(\log P_{cc'} - \log P_{c'} - \log P_c\big)

    Its minimum is :math:`-\log C` (identical, confident, balanced assignments). Returns a scalar.
    """
    check_tensor_pair(p1, "p1", p2, "p2", 2, "[B, C]")
    if p1.shape[0] < 1 or p1.shape[1] < 1:
        raise NcdError(f"p1 and p2 must be non-empty [B, C], got {tuple(p1.shape)}")
    joint = (p1.unsqueeze(2) * p2.unsqueeze(1)).sum(0)
    joint = (joint + joint.t()) / 2.0
    joint = joint / joint.sum()
    k = joint.shape[0]
    p_i = joint.sum(1).view(k, 1).expand(k, k)
    p_j = joint.sum(0).view(1, k).expand(k, k)
    eps = torch.tensor(IIC_EPS, dtype=joint.dtype, device=joint.device)
    joint = torch.where(joint < IIC_EPS, eps, joint)
    p_i = torch.where(p_i < IIC_EPS, eps, p_i)
    p_j = torch.where(p_j < IIC_EPS, eps, p_j)
    return -(joint * (joint.log() - p_j.log() - p_i.log())).sum()


def twostage_loss(features: Tensor, head_weights: Tensor, head_temperature: float = 0.1, temperature: float = 0.1,
                  neg_m: float = 1.0, *, normalize: str = "row") -> dict[str, Tensor]:
    r"""Stage 2's objective :math:`L = L_{cp} + \frac{1}{H}\sum_h L_{assign,h}` (official ``main.py``).

    Han et al., ECCV 2020, Eq. 14 with λ = 1. ``features`` ``[2B, d]`` (view-1 rows then view-2
    rows, unit vectors); ``head_weights`` ``[H, d, C]``, drawn N(0, 1) and never trained. Head h
    gives :math:`Y = ` :func:`ncd.models.normalized_fc` ``(features, W_h, head_temperature,
    normalize)`` and :math:`L_{assign,h} = ` :func:`iic_loss` ``(Y[:B], Y[B:])``;
    :math:`L_{cp}` = :func:`cp_loss` ``(features, temperature, neg_m)``.

    Returns ``loss``, ``loss_mi`` (mean over heads), ``loss_cp`` and ``mi_per_head`` ``[H]``.
    """
    _check_views(features, "features")
    check_tensor(head_weights, "head_weights", 3)
    if head_weights.shape[1] != features.shape[1] or head_weights.shape[0] < 1:
        raise NcdError(f"head_weights must be [H, d={features.shape[1]}, C], got {tuple(head_weights.shape)}")
    loss_cp = cp_loss(features, temperature, neg_m)
    b = features.shape[0] // 2
    mi = []
    for w in head_weights:
        y = normalized_fc(features, w, head_temperature, normalize)
        mi.append(iic_loss(y[:b], y[b:]))
    mi_per_head = torch.stack(mi)
    loss_mi = mi_per_head.mean()
    return {"loss": loss_cp + loss_mi, "loss_mi": loss_mi, "loss_cp": loss_cp, "mi_per_head": mi_per_head}
