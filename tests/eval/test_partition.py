"""The NumPy NMI / ARI of ncd.eval.partition against scikit-learn's (tests/test_import_weight.py checks
that the evaluators which fit nothing no longer import scikit-learn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics

from ncd.eval.partition import (
    adjusted_rand_index,
    contingency_matrix,
    normalized_mutual_info,
)


def _labellings(n: int, k_true: int, k_pred: int, agreement: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, k_true, n)
    p = np.where(rng.random(n) < agreement, t % k_pred, rng.integers(0, k_pred, n))
    # non-contiguous, shuffled ids: the scores must depend on the partition only
    return t * 3 - 7, rng.permutation(k_pred + 5)[p]


@pytest.mark.parametrize("n", [1, 2, 17, 500, 4000])
@pytest.mark.parametrize("k_true,k_pred", [(1, 1), (1, 4), (5, 1), (10, 10), (10, 30), (100, 100)])
@pytest.mark.parametrize("agreement", [0.0, 0.6, 1.0])
def test_nmi_ari_equal_sklearn(n: int, k_true: int, k_pred: int, agreement: float) -> None:
    t, p = _labellings(n, k_true, k_pred, agreement, seed=n * 1000 + k_true * 10 + k_pred)
    assert normalized_mutual_info(t, p) == pytest.approx(metrics.normalized_mutual_info_score(t, p), abs=1e-12)
    assert adjusted_rand_index(t, p) == pytest.approx(metrics.adjusted_rand_score(t, p), abs=1e-12)
    np.testing.assert_array_equal(contingency_matrix(t, p), metrics.cluster.contingency_matrix(t, p))


def test_special_cases_match_sklearn() -> None:
    cases = [
        ([0, 0, 0], [5, 5, 5]),        # one label each: perfect
        ([0, 1, 2], [0, 0, 0]),        # one cluster: NMI 0, ARI 0
        ([0, 1, 2], [2, 0, 1]),        # a permutation: 1
        ([0, 0, 1, 1], [0, 1, 0, 1]),  # independent: MI 0, ARI negative
        ([7], [3]),
    ]
    for t, p in cases:
        assert normalized_mutual_info(t, p) == pytest.approx(metrics.normalized_mutual_info_score(t, p), abs=1e-12)
        assert adjusted_rand_index(t, p) == pytest.approx(metrics.adjusted_rand_score(t, p), abs=1e-12)


def test_tensors_and_bad_shapes() -> None:
    t, p = _labellings(300, 10, 10, 0.7, seed=1)
    assert normalized_mutual_info(torch.from_numpy(t), torch.from_numpy(p)) == pytest.approx(
        normalized_mutual_info(t, p), abs=0)
    with pytest.raises(ValueError, match="same length"):
        adjusted_rand_index([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        normalized_mutual_info(np.zeros((2, 2), int), np.zeros((2, 2), int))

