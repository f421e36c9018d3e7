"""clustering_metrics (ACC, NMI, AMI, ARI) vs hand-written references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ncd.errors import NcdError
from ncd.eval.metrics import clustering_metrics


def ref_acc_bruteforce(pred, true):
    """Best one-to-one map of cluster ids to class ids by trying every injective assignment."""
    ps, ts = sorted(set(pred)), sorted(set(true))
    best = 0
    if len(ps) <= len(ts):
        for perm in itertools.permutations(ts, len(ps)):
            m = dict(zip(ps, perm))
            best = max(best, sum(m[p] == t for p, t in zip(pred, true)))
    else:
        for perm in itertools.permutations(ps, len(ts)):
            m = dict(zip(perm, ts))
            best = max(best, sum(m.get(p) == t for p, t in zip(pred, true)))
    return best / len(true)


def ref_nmi(pred, true):
    n = len(true)
    def h(x):
        return -sum(c / n * math.log(c / n) for c in np.unique(x, return_counts=True)[1])
    mi = 0.0
    for p in set(pred):
        for t in set(true):
            nij = sum(1 for a, b in zip(pred, true) if a == p and b == t)
            if nij:
                ni, nj = sum(1 for a in pred if a == p), sum(1 for b in true if b == t)
                mi += nij / n * math.log(n * nij / (ni * nj))
    hp, ht = h(pred), h(true)
    return 1.0 if hp == ht == 0 else mi / ((hp + ht) / 2)


def ref_ari(pred, true):
    def c2(x):
        return x * (x - 1) / 2
    n = len(true)
    pairs = sum(c2(sum(1 for a, b in zip(pred, true) if a == p and b == t)) for p in set(pred) for t in set(true))
    a = sum(c2(c) for c in np.unique(pred, return_counts=True)[1])
    b = sum(c2(c) for c in np.unique(true, return_counts=True)[1])
    expected = a * b / c2(n)
    return (pairs - expected) / ((a + b) / 2 - expected)


@pytest.mark.parametrize("k_pred,k_true", [(3, 3), (5, 3), (2, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_references(k_pred, k_true, seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k_true, 40)
    pred = np.where(rng.random(40) < 0.6, true % k_pred, rng.integers(0, k_pred, 40)) + 7  # ids need not start at 0
    res = clustering_metrics(pred, true)
    assert set(res) == {"acc", "nmi", "ami", "ari"}
    assert res["acc"] == pytest.approx(ref_acc_bruteforce(list(pred), list(true)))
    assert res["nmi"] == pytest.approx(ref_nmi(list(pred), list(true)))
    assert res["ari"] == pytest.approx(ref_ari(list(pred), list(true)))
    assert res["ami"] <= res["nmi"] + 1e-12


def test_majority_matching_for_over_clustering():
    true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # 4 pure clusters for 2 classes
    assert clustering_metrics(pred, true)["acc"] == 0.5  # one-to-one: two clusters unmatched
    assert clustering_metrics(pred, true, "majority")["acc"] == 1.0
    assert clustering_metrics(true, true)["ami"] == pytest.approx(1.0)


def test_metrics_bad_input():
    with pytest.raises(NcdError, match="same length"):
        clustering_metrics([0, 1], [0])
    with pytest.raises(NcdError, match="integer ids"):
        clustering_metrics(np.array([0.5, 1.0]), np.array([0, 1]))
    with pytest.raises(NcdError, match="acc_matching"):
        clustering_metrics([0], [0], "greedy")
    with pytest.raises(NcdError, match="at least one"):
        clustering_metrics(np.array([], dtype=int), np.array([], dtype=int))
