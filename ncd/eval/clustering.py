"""Clustering evaluation: SCAN's Hungarian protocol and head-selection loss, UNO's cluster accuracy.

* :func:`hungarian_evaluate` and :func:`scan_head_losses` follow SCAN's
  ``utils/evaluate_utils.py`` (Van Gansbeke et al., ECCV 2020; METHODS.md 1.3, 1.7).
* :func:`cluster_acc` follows UNO's ``utils/eval.py`` (Fini et al., ICCV 2021; METHODS.md 3.6).

The two Hungarian conventions differ (METHODS.md 4) and are kept separate on purpose.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ncd.errors import NcdError
from ncd.eval.partition import adjusted_rand_index, normalized_mutual_info

__all__ = ["hungarian_evaluate", "scan_head_losses", "cluster_acc"]

_EPS = 1e-8
#: Up to this many samples the head losses use the full N×N similarity like upstream (bit-equal);
#: above it, neighbour rows are gathered in chunks (same formula, float32 rounding may differ).
_FULL_MATRIX_MAX_N = 4096
_GATHER_CHUNK_ELEMS = 1 << 24

ArrayLike = Tensor | np.ndarray


def _to_int_numpy(x: Any, name: str) -> np.ndarray:
    """1-D int64 NumPy copy of a tensor / array / sequence of integer ids."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise NcdError(f"{name} must be a 1-D vector of ids, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise NcdError(f"{name} must contain integer ids, got non-integer values")
    elif arr.dtype.kind not in "iub":
        raise NcdError(f"{name} must contain integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


_UNMATCHED = ("zero", "wrong")


def hungarian_evaluate(
    predictions: ArrayLike,
    targets: ArrayLike,
    probabilities: ArrayLike | None = None,
    *,
    return_reordered: bool = False,
    unmatched: str = "zero",
) -> dict[str, Any]:
    r"""Hungarian-matched ACC, NMI, ARI (and top-5) in SCAN's protocol (``hungarian_evaluate``).

    Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels" (ECCV 2020); matching
    code "based on IIC" (Ji et al., ICCV 2019).

    * :math:`K` = number of distinct values in ``targets``; count matrix
      :math:`M[c, t] = \#\{i: \text{pred}_i = c, \text{target}_i = t\}` over cluster ids and class
      ids ``0..K-1`` only; one-to-one matching ``linear_sum_assignment(N - M)``.
    * Matched predictions start as a vector of zeros and every cluster ``c`` matched to class
      ``t`` is rewritten to ``t``. ACC = mean(matched prediction == target).
    * NMI = ``normalized_mutual_info_score(targets, predictions)``, ARI =
      ``adjusted_rand_score(targets, predictions)`` (sklearn defaults, raw ids; computed the same way
      by :mod:`ncd.eval.partition` without importing scikit-learn).
    * With ``probabilities`` (``[N, C]``): the 5 most probable clusters of each sample are mapped
      through the same matching and ``acc_top5`` = (number of mapped entries equal to the label)
      / N; ``match`` = list of ``(cluster, class)`` int pairs.

    Official quirk kept by default (``unmatched="zero"``): a cluster id that takes part in no
    match (an id ≥ K, e.g. with over-clustering) is mapped to class **0**, because the matched
    vector is initialised with zeros; such samples count as correct when their label is 0, and in
    top-5 each such entry can hit a label-0 sample again. ``unmatched="wrong"`` makes unmatched
    clusters never correct (and counts a top-5 hit at most once per sample).
    With fewer than 5 columns in ``probabilities`` all columns are used (upstream would fail).

    ``return_reordered=True`` adds ``reordered`` (int64 tensor, the matched predictions) and
    ``confusion`` (int64 tensor ``[K, K]``, rows = target class, columns = matched prediction,
    class ids ``0..K-1``; SCAN plots ``sklearn.metrics.confusion_matrix(targets, reordered)``).

    Accepts torch tensors or NumPy arrays. Returns python floats for the metrics.
    """
    if unmatched not in _UNMATCHED:
        raise NcdError(f"unmatched must be one of {_UNMATCHED}, got {unmatched!r}")
    preds = _to_int_numpy(predictions, "predictions")
    tgts = _to_int_numpy(targets, "targets")
    if preds.shape != tgts.shape:
        raise NcdError(f"predictions and targets must have the same length, got {preds.size} and {tgts.size}")
    num_elems = tgts.size
    if num_elems == 0:
        raise NcdError("hungarian_evaluate needs at least one sample")
    num_k = int(np.unique(tgts).size)

    # count matrix over cluster ids and class ids 0..K-1 (float like upstream's np.zeros)
    keep = (preds >= 0) & (preds < num_k) & (tgts >= 0) & (tgts < num_k)
    num_correct = np.zeros((num_k, num_k))
    np.add.at(num_correct, (preds[keep], tgts[keep]), 1)
    rows, cols = linear_sum_assignment(num_elems - num_correct)
    match = [(int(r), int(c)) for r, c in zip(rows, cols)]

    fill = 0 if unmatched == "zero" else -1
    reordered = np.full(num_elems, fill, dtype=np.int64)
    for pred_i, target_i in match:
        reordered[preds == pred_i] = target_i
    hit = reordered == tgts
    if unmatched == "wrong":
        hit &= reordered >= 0
    acc = int(hit.sum()) / float(num_elems)
    nmi = normalized_mutual_info(tgts, preds)
    ari = adjusted_rand_index(tgts, preds)
    out: dict[str, Any] = {"acc": float(acc), "nmi": float(nmi), "ari": float(ari)}

    if probabilities is not None:
        probs = probabilities.detach().cpu() if isinstance(probabilities, Tensor) else torch.as_tensor(np.asarray(probabilities))
        if probs.dim() != 2 or probs.shape[0] != num_elems:
            raise NcdError(f"probabilities must have shape [N={num_elems}, C], got {tuple(probs.shape)}")
        if probs.shape[1] < 1:
            raise NcdError("probabilities must have at least one column")
        _, top = probs.topk(min(5, probs.shape[1]), 1, largest=True)
        top = top.numpy()
        mapped = np.full(top.shape, fill, dtype=np.int64)
        for pred_i, target_i in match:
            mapped[top == pred_i] = target_i
        correct = mapped == tgts[:, None]
        if unmatched == "wrong":
            correct = (correct & (mapped >= 0)).any(axis=1)
        out["acc_top5"] = float(correct.sum()) / float(num_elems)
        out["match"] = match

    if return_reordered:
        conf = np.zeros((num_k, num_k), dtype=np.int64)
        ok = (tgts >= 0) & (tgts < num_k) & (reordered >= 0) & (reordered < num_k)
        np.add.at(conf, (tgts[ok], reordered[ok]), 1)
        out["reordered"] = torch.from_numpy(reordered.astype(np.int64))
        out["confusion"] = torch.from_numpy(conf)
    return out


def _as_float_tensor(x: ArrayLike, name: str) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if not t.is_floating_point():
        raise NcdError(f"{name} must be floating point, got dtype {t.dtype}")
    return t


def scan_head_losses(probabilities: ArrayLike, neighbors: ArrayLike) -> dict[str, Any]:
    r"""SCAN's validation loss per head, used to pick the head / checkpoint (``scan_evaluate``).

    Van Gansbeke et al., ECCV 2020 (METHODS.md 1.3, "Head / checkpoint selection loss").
    ``probabilities`` ``[H, N, K]`` (softmax outputs; ``[N, K]`` is taken as one head),
    ``neighbors`` ``[N, k+1]`` integer indices with the sample itself in column 0. Per head:

    .. math::
        \text{entropy} = H(\max(\tfrac{1}{N}\textstyle\sum_i P_i, 10^{-8}))

        \text{consistency} = \frac{1}{N(k+1)} \sum_{i}\sum_{j \in \text{nbr}(i)}
            -\max(\log \operatorname{clip}_{[0,1]}\langle P_i, P_j\rangle, -100)

        \text{total} = \text{consistency} - \text{entropy}

    All ``N·(k+1)`` pairs count, self-pairs included; the entropy weight is 1 (not the training
    weight). ``best_head`` = argmin of ``total`` (first on ties, as ``np.argmin``).

    Up to 4096 samples the full ``P Pᵀ`` is formed as upstream; above that only the needed rows
    are gathered (chunked), which bounds memory and gives the same numbers up to float32 rounding.

    Returns ``entropy``, ``consistency``, ``total``: float64 tensors ``[H]`` (upstream takes
    ``.item()`` of the float32 values and subtracts in python floats), and ``best_head`` (int).
    """
    probs = _as_float_tensor(probabilities, "probabilities")
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    if probs.dim() != 3:
        raise NcdError(f"probabilities must have shape [H, N, K], got {tuple(probs.shape)}")
    num_heads, n, _ = probs.shape
    nbrs = neighbors.detach() if isinstance(neighbors, Tensor) else torch.as_tensor(np.asarray(neighbors))
    if nbrs.is_floating_point() or nbrs.dtype == torch.bool:
        raise NcdError(f"neighbors must be integer indices, got dtype {nbrs.dtype}")
    if nbrs.dim() != 2 or nbrs.shape[0] != n or nbrs.shape[1] < 1:
        raise NcdError(f"neighbors must have shape [N={n}, k+1], got {tuple(nbrs.shape)}")
    if num_heads < 1 or n < 1:
        raise NcdError(f"probabilities must be non-empty, got shape {tuple(probs.shape)}")
    nbrs = nbrs.to(device=probs.device, dtype=torch.long)
    if int(nbrs.min()) < 0 or int(nbrs.max()) >= n:
        raise NcdError(f"neighbors must index samples 0..{n - 1}, got range [{int(nbrs.min())}, {int(nbrs.max())}]")

    anchors = torch.arange(n, device=probs.device).view(-1, 1).expand_as(nbrs).reshape(-1)
    flat_nbrs = nbrs.reshape(-1)
    entropies, consistencies = [], []
    with torch.no_grad():
        for head in probs:
            mean = torch.clamp(torch.mean(head, dim=0), min=_EPS)
            entropies.append(float(-(mean * torch.log(mean)).sum()))
            if n <= _FULL_MATRIX_MAX_N:
                similarity = torch.matmul(head, head.t())[anchors, flat_nbrs]
            else:
                k1, kk = nbrs.shape[1], head.shape[1]
                rows = max(1, _GATHER_CHUNK_ELEMS // (k1 * kk))
                parts = []
                for s in range(0, n, rows):
                    block = head[nbrs[s : s + rows]]  # [r, k+1, K]
                    parts.append(torch.bmm(block, head[s : s + rows].unsqueeze(2)).squeeze(2))
                similarity = torch.cat(parts, 0).reshape(-1)
            similarity = torch.clamp(similarity, 0.0, 1.0)
            consistencies.append(float(F.binary_cross_entropy(similarity, torch.ones_like(similarity))))
    entropy = torch.tensor(entropies, dtype=torch.float64)
    consistency = torch.tensor(consistencies, dtype=torch.float64)
    total = torch.tensor([c - e for c, e in zip(consistencies, entropies)], dtype=torch.float64)
    return {
        "entropy": entropy,
        "consistency": consistency,
        "total": total,
        "best_head": int(np.argmin(total.numpy())),
    }


def cluster_acc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    r"""Clustering accuracy with a square Hungarian matching, UNO's protocol (``cluster_acc``).

    Fini et al., "A Unified Objective for Novel Class Discovery" (ICCV 2021); the function comes
    from DEC (Xie et al., ICML 2016). :math:`D = \max(\max \hat y, \max y) + 1`,
    :math:`w[p, t] = \#\{i: \hat y_i = p, y_i = t\}` (``D×D``), matching
    ``linear_sum_assignment(w.max() - w)``, ACC = Σ matched counts / N. Every id takes part in
    the matching (so any cluster can be matched to any class). Ids are used as given: UNO shifts
    its targets to start at 0 before calling this. Accepts NumPy arrays or torch tensors.
    """
    t = _to_int_numpy(y_true, "y_true")
    p = _to_int_numpy(y_pred, "y_pred")
    if t.size != p.size:
        raise NcdError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    if p.size == 0:
        raise NcdError("cluster_acc needs at least one sample")
    if t.min() < 0 or p.min() < 0:
        raise NcdError("cluster_acc needs non-negative ids (shift the labels to start at 0)")
    d = int(max(p.max(), t.max())) + 1
    w = np.zeros((d, d), dtype=np.int64)
    np.add.at(w, (p, t), 1)
    rows, cols = linear_sum_assignment(w.max() - w)
    return sum(int(w[i, j]) for i, j in zip(rows, cols)) * 1.0 / p.size
