"""Weighted kNN (NPID style, METHODS.md 7) vs a hand-written NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncd.errors import NcdError
from ncd.eval import weighted_knn


def ref_knn(train_f, train_y, test_f, test_y, c, k, sigma):
    """Loop reference: top-k by inner product, votes exp(sim / sigma), rank classes (ties: lower id)."""
    k = min(k, len(train_f))
    scores = np.zeros((len(test_f), c))
    for i, q in enumerate(test_f):
        sims = [float(np.dot(q, f)) for f in train_f]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        for j in order:
            scores[i, train_y[j]] += math.exp(sims[j] / sigma)
    ranked = [sorted(range(c), key=lambda cc: (-row[cc], cc)) for row in scores]
    preds = np.array([r[0] for r in ranked])
    top1 = float(np.mean(preds == test_y))
    top5 = float(np.mean([t in r[:5] for r, t in zip(ranked, test_y)]))
    return scores, preds, top1, top5


def make_data(n_train, n_test, d, c, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=dtype), dim=1)
    ytr = torch.randint(0, c, (n_train,), generator=g)
    yte = torch.randint(0, c, (n_test,), generator=g)
    ftr = torch.nn.functional.normalize(centers[ytr] + 0.8 * torch.randn(n_train, d, generator=g, dtype=dtype), dim=1)
    fte = torch.nn.functional.normalize(centers[yte] + 0.8 * torch.randn(n_test, d, generator=g, dtype=dtype), dim=1)
    return ftr, ytr, fte, yte


def _clear(values: np.ndarray, cuts: tuple[int, ...], rtol: float) -> bool:
    """``values`` sorted descending: the ``cut`` largest are set apart from the rest by more than ``rtol``
    (relative to the largest) for every cut, exact ties aside (zero scores of classes without
    neighbours rank by id everywhere)."""
    top = np.sort(values)[::-1]
    gaps = [top[c - 1] - top[c] for c in cuts if c < len(top)]
    return all(g > rtol * abs(top[0]) or g == 0 for g in gaps)


def untied_data(n_train, n_test, d, c, seed, k, sigma, rtol=1e-9, dtype=torch.float64):
    """:func:`make_data` whose reference has no near-tie that rounding could flip: not at the k-th
    neighbour's cut, nor at the top-1 and top-5 cuts of the ranked class scores. A draw with one is
    redrawn from another seed; ``rtol`` is the relative size of a tie (larger for float32 features)."""
    for attempt in range(100):
        ftr, ytr, fte, yte = make_data(n_train, n_test, d, c, seed + 7919 * attempt, dtype)
        ftr64, fte64 = ftr.double().numpy(), fte.double().numpy()
        sims = fte64 @ ftr64.T
        scores = ref_knn(ftr64, ytr.numpy(), fte64, yte.numpy(), c, k, sigma)[0]
        if all(_clear(row, (k,), rtol) for row in sims) and all(_clear(row, (1, 5), rtol) for row in scores):
            return ftr, ytr, fte, yte
    raise AssertionError(f"no tie-free kNN data for seed {seed} in 100 tries")


@pytest.mark.parametrize("k", [1, 5, 200, 1000])
@pytest.mark.parametrize("sigma", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("c", [2, 3, 10])
def test_knn_matches_reference(k, sigma, c):
    ftr, ytr, fte, yte = untied_data(120, 30, 8, c, k + c, k, sigma)
    out = weighted_knn(ftr, ytr, fte, yte, c, k=k, sigma=sigma)
    scores, preds, top1, top5 = ref_knn(ftr.numpy(), ytr.numpy(), fte.numpy(), yte.numpy(), c, k, sigma)
    assert set(out) == {"top1", "top5", "class_scores", "predictions"}
    assert out["class_scores"].shape == (30, c)
    np.testing.assert_allclose(out["class_scores"].numpy(), scores, rtol=1e-10)
    assert out["predictions"].dtype == torch.long
    assert out["predictions"].tolist() == preds.tolist()
    assert isinstance(out["top1"], float) and isinstance(out["top5"], float)
    assert out["top1"] == pytest.approx(top1) and out["top5"] == pytest.approx(top5)
    assert 0.0 <= out["top1"] <= out["top5"] <= 1.0


def test_knn_defaults_k200_sigma01():
    ftr, ytr, fte, yte = untied_data(250, 20, 6, 4, 1, 200, 0.1, rtol=1e-5, dtype=torch.float32)  # float32 vs float64
    out = weighted_knn(ftr, ytr, fte, yte, 4)
    scores, preds, top1, _ = ref_knn(ftr.double().numpy(), ytr.numpy(), fte.double().numpy(), yte.numpy(), 4, 200, 0.1)
    np.testing.assert_allclose(out["class_scores"].numpy(), scores, rtol=1e-4)
    assert out["class_scores"].dtype == torch.float32
    assert out["top1"] == pytest.approx(top1)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_knn_chunking_does_not_change_results(chunk):
    ftr, ytr, fte, yte = untied_data(80, 33, 5, 6, 2, 10, 0.1)
    ref = weighted_knn(ftr, ytr, fte, yte, 6, k=10)
    out = weighted_knn(ftr, ytr, fte, yte, 6, k=10, chunk_size=chunk)
    # a 1-row matmul may round differently from a many-row one: equal up to float64 ulps
    torch.testing.assert_close(out["class_scores"], ref["class_scores"], rtol=1e-12, atol=0)
    assert torch.equal(out["predictions"], ref["predictions"])


def test_knn_hand_computed():
    ftr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]], dtype=torch.float64)
    ytr = torch.tensor([0, 1, 1])
    fte = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    out = weighted_knn(ftr, ytr, fte, torch.tensor([0]), 2, k=2, sigma=1.0)
    # neighbours: train 0 (sim 1, label 0) and train 2 (sim 0.7071, label 1)
    np.testing.assert_allclose(out["class_scores"].numpy(), [[math.e, math.exp(math.sqrt(0.5))]])
    assert out["predictions"].tolist() == [0] and out["top1"] == 1.0 and out["top5"] == 1.0
    # k = 3 adds train 1 (sim 0, exp 0 = 1) to class 1: e^0.707 + 1 = 3.03 > e -> class 1
    out = weighted_knn(ftr, ytr, fte, torch.tensor([0]), 2, k=3, sigma=1.0)
    assert out["predictions"].tolist() == [1] and out["top1"] == 0.0


def test_knn_k_larger_than_train_set():
    ftr, ytr, fte, yte = make_data(7, 5, 4, 3, seed=3)
    a = weighted_knn(ftr, ytr, fte, yte, 3, k=500)
    b = weighted_knn(ftr, ytr, fte, yte, 3, k=7)
    assert torch.equal(a["class_scores"], b["class_scores"])
    scores, preds, _, _ = ref_knn(ftr.numpy(), ytr.numpy(), fte.numpy(), yte.numpy(), 3, 500, 0.1)
    np.testing.assert_allclose(a["class_scores"].numpy(), scores, rtol=1e-10)


def test_knn_score_ties_go_to_lower_class():
    ftr = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    fte = torch.tensor([[1.0, 0.0]])
    out = weighted_knn(ftr, torch.tensor([2, 1]), fte, torch.tensor([1]), 3, k=2)
    assert out["predictions"].tolist() == [1] and out["top1"] == 1.0


def test_knn_top5_with_many_classes():
    # label ranked 3rd -> top5 hit, top1 miss
    ftr = torch.eye(4, dtype=torch.float64)
    ftr[1] = torch.tensor([0.9, math.sqrt(1 - 0.81), 0, 0], dtype=torch.float64)
    ftr[2] = torch.tensor([0.5, 0, math.sqrt(0.75), 0], dtype=torch.float64)
    ytr = torch.tensor([0, 1, 2, 3])
    fte = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = weighted_knn(ftr, ytr, fte, torch.tensor([2]), 10, k=4)
    assert out["predictions"].tolist() == [0]
    assert out["top1"] == 0.0 and out["top5"] == 1.0
    out = weighted_knn(ftr, ytr, fte, torch.tensor([2]), 10, k=2)
    # class 2 not among the neighbours: zero score, but ties among zero scores rank by id, so
    # the first five ranked classes are 0, 1, 2, 3, 4 -> still a top-5 hit (NPID counting)
    assert out["top5"] == 1.0
    out = weighted_knn(ftr, ytr, fte, torch.tensor([7]), 10, k=2)
    assert out["top5"] == 0.0


def test_knn_features_not_renormalised():
    ftr = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    fte = torch.tensor([[1.0, 1.0]])
    out = weighted_knn(ftr, torch.tensor([0, 1]), fte, torch.tensor([0]), 2, k=2, sigma=1.0)
    np.testing.assert_allclose(out["class_scores"].numpy(), [[math.exp(2.0), math.e]], rtol=1e-6)


def test_knn_numpy_inputs():
    ftr, ytr, fte, yte = make_data(30, 10, 4, 3, seed=9)
    a = weighted_knn(ftr, ytr, fte, yte, 3, k=5)
    b = weighted_knn(ftr.numpy(), ytr.numpy(), fte.numpy(), yte.numpy(), 3, k=5)
    assert torch.equal(a["class_scores"], b["class_scores"]) and a["top1"] == b["top1"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(k=0),
        dict(sigma=0.0),
        dict(num_classes=2),  # labels reach 2
        dict(chunk_size=0),
        dict(test_features=torch.zeros(4, 3)),
        dict(train_labels=torch.zeros(5, dtype=torch.long)),
        dict(test_labels=torch.zeros(4)),
    ],
)
def test_knn_bad_input(kwargs):
    args = dict(
        train_features=torch.zeros(6, 2),
        train_labels=torch.tensor([0, 1, 2, 0, 1, 2]),
        test_features=torch.zeros(4, 2),
        test_labels=torch.tensor([0, 1, 2, 0]),
        num_classes=3,
    )
    args.update(kwargs)
    with pytest.raises(NcdError):
        weighted_knn(**args)
