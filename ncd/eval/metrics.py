"""Clustering metrics of a labelling against the true classes: ACC, NMI, adjusted NMI, ARI.

SeLa's README compares its learned pseudo-labels with the ImageNet classes by NMI, adjusted NMI
("aNMI"), ARI and a Hungarian "Label-Acc"; the computation is not in the official repository
(METHODS.md 2.6), so it is written here from the definitions with scikit-learn and SciPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from ncd.errors import NcdError
from ncd.eval.partition import adjusted_rand_index, normalized_mutual_info

__all__ = ["clustering_metrics", "ACC_MATCHINGS"]

ACC_MATCHINGS = ("hungarian", "majority")


def _ids(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise NcdError(f"{name} must be a 1-D vector of ids, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise NcdError(f"{name} must contain integer ids, got dtype {a.dtype}")
    return a.astype(np.int64)


def clustering_metrics(predictions: Any, targets: Any, acc_matching: str = "hungarian") -> dict[str, float]:
    r"""ACC, NMI, AMI and ARI of cluster ids ``predictions`` against class ids ``targets``.

    * ``acc``: with counts :math:`M[p, t] = \#\{i: \hat y_i = p,\ y_i = t\}` over the cluster and class ids
      that occur, ``"hungarian"`` (default) finds the one-to-one matching of clusters to classes that
      maximises the matched count (``linear_sum_assignment`` on the rectangular ``M``): when the number
      of clusters K differs from the number of classes C only min(K, C) pairs are matched and the
      samples of unmatched clusters count as errors (for K = C this is the usual Hungarian accuracy,
      e.g. UNO's ``cluster_acc``). ``"majority"`` maps every cluster to its most frequent class
      (many-to-one, the usual over-clustering accuracy).
    * ``nmi``: ``normalized_mutual_info_score`` (arithmetic normalisation), ``ami``:
      ``adjusted_mutual_info_score`` (SeLa's "aNMI"), ``ari``: ``adjusted_rand_score``; scikit-learn
      defaults on the raw ids.

    Accepts NumPy arrays or tensors; returns python floats.
    """
    if acc_matching not in ACC_MATCHINGS:
        raise NcdError(f"acc_matching must be one of {', '.join(ACC_MATCHINGS)}, got {acc_matching!r}")
    p, t = _ids(predictions, "predictions"), _ids(targets, "targets")
    if p.size != t.size:
        raise NcdError(f"predictions and targets must have the same length, got {p.size} and {t.size}")
    if p.size == 0:
        raise NcdError("clustering_metrics needs at least one sample")
    _, pi = np.unique(p, return_inverse=True)
    _, ti = np.unique(t, return_inverse=True)
    counts = np.zeros((pi.max() + 1, ti.max() + 1), dtype=np.int64)
    np.add.at(counts, (pi, ti), 1)
    if acc_matching == "hungarian":
        rows, cols = linear_sum_assignment(counts, maximize=True)
        matched = int(counts[rows, cols].sum())
    else:
        matched = int(counts.max(axis=1).sum())
    # lazily: scikit-learn's import costs about a second, and only the adjusted MI needs it here
    from sklearn.metrics import adjusted_mutual_info_score

    return {
        "acc": matched / p.size,
        "nmi": normalized_mutual_info(t, p),
        "ami": float(adjusted_mutual_info_score(t, p)),
        "ari": adjusted_rand_index(t, p),
    }
