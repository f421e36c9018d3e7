"""Agreement of two labellings: NMI and ARI in NumPy alone.

An evaluate job only needs these two scores, and ``import sklearn.metrics`` costs about one second of
start-up (scikit-learn's package import pulls in ``scipy.stats``, whose decorators parse hundreds of
docstrings), more than the evaluation itself on digits. So the two closed forms are written here,
operation for operation as scikit-learn 1.9's ``normalized_mutual_info_score`` (arithmetic mean) and
``adjusted_rand_score`` compute them, which is what SCAN's and UNO's evaluation code calls;
``tests/eval/test_partition.py`` checks them against scikit-learn on random labellings. Measures with
no cheap closed form (the adjusted mutual information) still come from scikit-learn.
"""

from __future__ import annotations

from math import log
from typing import Any

import numpy as np

__all__ = ["contingency_matrix", "normalized_mutual_info", "adjusted_rand_index"]


def _labels(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _pair(labels_true: Any, labels_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(labels_true, "labels_true"), _labels(labels_pred, "labels_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"labels_true and labels_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    return t, p


def contingency_matrix(labels_true: Any, labels_pred: Any) -> np.ndarray:
    r"""Dense int64 counts :math:`n_{ck} = \#\{i: y_i = c,\ \hat y_i = k\}`, rows = the sorted distinct
    true labels, columns = the sorted distinct predicted labels (``sklearn.metrics.cluster.contingency_matrix``)."""
    t, p = _pair(labels_true, labels_pred)
    classes, ci = np.unique(t, return_inverse=True)
    clusters, ki = np.unique(p, return_inverse=True)
    counts = np.zeros((classes.shape[0], clusters.shape[0]), dtype=np.int64)
    np.add.at(counts, (ci.ravel(), ki.ravel()), 1)
    return counts


def _entropy(pi: np.ndarray) -> float:
    """Entropy (natural log) of a labelling from its float64 label counts, as scikit-learn's ``_entropy``."""
    pi_sum = np.sum(pi)
    # log(a / b) as log(a) - log(b), as scikit-learn does, for the same rounding
    return float(-np.sum((pi / pi_sum) * (np.log(pi) - log(pi_sum))))


def normalized_mutual_info(labels_true: Any, labels_pred: Any) -> float:
    r"""Normalised mutual information with the arithmetic mean of the entropies:
    :math:`\mathrm{NMI} = \frac{I(Y; \hat Y)}{(H(Y) + H(\hat Y)) / 2}`, natural logarithms,
    :math:`I = \sum_{c,k} \frac{n_{ck}}{N} \log \frac{N\, n_{ck}}{n_c\, n_k}`.

    Equals ``sklearn.metrics.normalized_mutual_info_score(labels_true, labels_pred)`` (its default
    ``average_method="arithmetic"``), special cases included: 1.0 when both labellings have one
    label (or none), 0.0 when the mutual information is 0. Used by SCAN (Van Gansbeke et al., ECCV
    2020) and UNO (Fini et al., ICCV 2021) through scikit-learn.
    """
    counts = contingency_matrix(labels_true, labels_pred)
    n_classes, n_clusters = counts.shape
    if n_classes == n_clusters == 1 or n_classes == n_clusters == 0:
        return 1.0
    if n_classes == 1 or n_clusters == 1:
        return 0.0
    cont = counts.astype(np.float64)
    nzx, nzy = np.nonzero(cont)  # row-major, the order of scikit-learn's CSR ``find``
    nz_val = cont[nzx, nzy]
    contingency_sum = cont.sum()
    pi = cont.sum(axis=1)
    pj = cont.sum(axis=0)
    log_contingency_nm = np.log(nz_val)
    contingency_nm = nz_val / contingency_sum
    outer = pi.take(nzx).astype(np.int64, copy=False) * pj.take(nzy).astype(np.int64, copy=False)
    log_outer = -np.log(outer) + log(pi.sum()) + log(pj.sum())
    mi = contingency_nm * (log_contingency_nm - log(contingency_sum)) + contingency_nm * log_outer
    mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
    mi = float(np.clip(mi.sum(), 0.0, None))
    if mi == 0:
        return 0.0
    # the label counts are the contingency's margins (scikit-learn counts them again from the labels)
    normalizer = np.mean([_entropy(pi), _entropy(pj)])
    return float(mi / normalizer)


def adjusted_rand_index(labels_true: Any, labels_pred: Any) -> float:
    r"""Adjusted Rand index (Hubert & Arabie, 1985) from the pair confusion matrix
    :math:`\begin{pmatrix} tn & fp \\ fn & tp \end{pmatrix}` (ordered pairs):
    :math:`\mathrm{ARI} = \frac{2\,(tp\cdot tn - fn\cdot fp)}{(tp + fn)(fn + tn) + (tp + fp)(fp + tn)}`,
    1.0 when ``fn == fp == 0``.

    Equals ``sklearn.metrics.adjusted_rand_score(labels_true, labels_pred)``: integer pair counts,
    Python integers for the products (no overflow), one final division.
    """
    cont = contingency_matrix(labels_true, labels_pred)
    n_samples = int(cont.sum())
    n_c = cont.sum(axis=1)
    n_k = cont.sum(axis=0)
    sum_squares = int((cont**2).sum())
    fp = int((cont @ n_k).sum()) - sum_squares
    fn = int((cont.T @ n_c).sum()) - sum_squares
    tp = sum_squares - n_samples
    tn = n_samples**2 - fp - fn - sum_squares
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
