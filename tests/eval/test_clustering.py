"""SCAN Hungarian evaluation, SCAN head-selection loss and UNO cluster accuracy vs NumPy references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import ncd.eval.clustering as clustering
from ncd.errors import NcdError
from ncd.eval import cluster_acc, hungarian_evaluate, scan_head_losses

# ----------------------------------------------------------------------------- references


def ref_scan_acc(preds: np.ndarray, targets: np.ndarray) -> float:
    """SCAN's ACC by brute force over all one-to-one matchings of ids 0..K-1 (K = #labels).

    Samples whose cluster id is not matched keep the value 0 of the zero-initialised vector.
    """
    k = len(set(targets.tolist()))
    best = -1
    for perm in itertools.permutations(range(k)):
        correct = 0
        for p, t in zip(preds, targets):
            mapped = perm[p] if 0 <= p < k else 0
            correct += int(mapped == t)
        best = max(best, correct)
    return best / len(targets)


def ref_scan_top5(probs: np.ndarray, targets: np.ndarray, match: list[tuple[int, int]]) -> float:
    m = dict(match)
    hits = 0
    for row, t in zip(probs, targets):
        top = sorted(range(len(row)), key=lambda c: -row[c])[:5]
        hits += sum(int(m.get(c, 0) == t) for c in top)
    return hits / len(targets)


def ref_nmi(a: np.ndarray, b: np.ndarray) -> float:
    """NMI with arithmetic normalisation: I(a;b) / ((H(a)+H(b))/2)."""
    n = len(a)
    pa = {x: np.mean(a == x) for x in set(a.tolist())}
    pb = {y: np.mean(b == y) for y in set(b.tolist())}
    mi = 0.0
    for x in pa:
        for y in pb:
            pxy = np.sum((a == x) & (b == y)) / n
            if pxy > 0:
                mi += pxy * math.log(pxy / (pa[x] * pb[y]))
    ha = -sum(p * math.log(p) for p in pa.values())
    hb = -sum(p * math.log(p) for p in pb.values())
    if ha == 0 and hb == 0:
        return 1.0
    return mi / ((ha + hb) / 2)


def ref_ari(a: np.ndarray, b: np.ndarray) -> float:
    def c2(x: float) -> float:
        return x * (x - 1) / 2

    n = len(a)
    xs, ys = sorted(set(a.tolist())), sorted(set(b.tolist()))
    table = np.array([[np.sum((a == x) & (b == y)) for y in ys] for x in xs], dtype=float)
    index = sum(c2(v) for v in table.ravel())
    sa = sum(c2(v) for v in table.sum(1))
    sb = sum(c2(v) for v in table.sum(0))
    expected = sa * sb / c2(n)
    mx = (sa + sb) / 2
    if mx == expected:
        return 1.0
    return (index - expected) / (mx - expected)


def ref_cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """UNO: square D×D matching, D = max id + 1, best total by brute force."""
    d = max(y_true.max(), y_pred.max()) + 1
    w = np.zeros((d, d), dtype=int)
    for p, t in zip(y_pred, y_true):
        w[p, t] += 1
    best = max(sum(w[i, perm[i]] for i in range(d)) for perm in itertools.permutations(range(d)))
    return best / len(y_true)


def ref_head_losses(probs: np.ndarray, nbrs: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    ents, conss, tots = [], [], []
    for p in probs:
        mean = np.maximum(p.mean(axis=0), 1e-8)
        ent = float(-(mean * np.log(mean)).sum())
        terms = []
        for i in range(nbrs.shape[0]):
            for j in nbrs[i]:
                s = min(max(float(np.dot(p[i], p[j])), 0.0), 1.0)
                terms.append(-max(math.log(s) if s > 0 else -math.inf, -100.0))
        cons = float(np.mean(terms))
        ents.append(ent)
        conss.append(cons)
        tots.append(cons - ent)
    return ents, conss, tots


def random_case(n: int, k: int, seed: int, noise: float = 0.4, extra_clusters: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k, n)
    perm = rng.permutation(k + extra_clusters)
    preds = perm[targets]
    flip = rng.random(n) < noise
    preds[flip] = rng.integers(0, k + extra_clusters, flip.sum())
    return preds, targets


# ----------------------------------------------------------------------------- hungarian_evaluate


@pytest.mark.parametrize("n", [10, 57, 200])
@pytest.mark.parametrize("k", [2, 3, 5, 6])
@pytest.mark.parametrize("noise", [0.0, 0.3, 0.9])
def test_hungarian_matches_reference(n, k, noise):
    preds, targets = random_case(n, k, seed=n * 13 + k, noise=noise)
    rng = np.random.default_rng(n + k)
    probs = rng.random((n, max(k, 5)))
    probs[np.arange(n), preds] += 10.0  # predictions are the argmax
    out = hungarian_evaluate(torch.from_numpy(preds), torch.from_numpy(targets), torch.from_numpy(probs))
    k_eff = len(set(targets.tolist()))
    assert set(out) == {"acc", "nmi", "ari", "acc_top5", "match"}
    assert all(isinstance(out[key], float) for key in ("acc", "nmi", "ari", "acc_top5"))
    assert out["acc"] == pytest.approx(ref_scan_acc(preds, targets), abs=1e-12)
    assert out["nmi"] == pytest.approx(ref_nmi(targets, preds), abs=1e-10)
    assert out["ari"] == pytest.approx(ref_ari(targets, preds), abs=1e-10)
    match = out["match"]
    assert len(match) == k_eff
    assert all(isinstance(a, int) and isinstance(b, int) for a, b in match)
    assert sorted(a for a, _ in match) == list(range(k_eff)) and sorted(b for _, b in match) == list(range(k_eff))
    assert out["acc_top5"] == pytest.approx(ref_scan_top5(probs, targets, match), abs=1e-12)


def test_hungarian_without_probabilities_has_no_top5():
    out = hungarian_evaluate(np.array([0, 1, 1]), np.array([1, 0, 0]))
    assert set(out) == {"acc", "nmi", "ari"}
    assert out["acc"] == 1.0


def test_hungarian_hand_computed_4_samples():
    # counts over K=2: M[1,0] = 2, M[0,1] = 1 -> match 0->1, 1->0; cluster 2 is unmatched -> 0
    preds, targets = np.array([1, 1, 0, 2]), np.array([0, 0, 1, 1])
    out = hungarian_evaluate(preds, targets, return_reordered=True)
    assert out["acc"] == 0.75
    assert out["reordered"].tolist() == [0, 0, 1, 0]
    # rows = target, columns = matched prediction
    assert out["confusion"].tolist() == [[2, 0], [1, 1]]
    assert out["nmi"] == pytest.approx(ref_nmi(targets, preds), abs=1e-12)
    assert out["ari"] == pytest.approx(ref_ari(targets, preds), abs=1e-12)


def test_hungarian_cluster_ids_ge_k_become_class_0_like_official():
    # official quirk: the matched vector starts at 0, so cluster 2 (>= K) "predicts" class 0
    preds, targets = np.array([1, 1, 0, 2]), np.array([0, 0, 1, 0])
    assert hungarian_evaluate(preds, targets)["acc"] == 1.0
    assert hungarian_evaluate(preds, targets, unmatched="wrong")["acc"] == 0.75
    assert hungarian_evaluate(preds, targets, unmatched="wrong", return_reordered=True)["reordered"].tolist() == [0, 0, 1, -1]


def test_hungarian_overclustering_top5_official_counting():
    # K = 2 labels, 6 cluster columns: clusters 2..5 are unmatched and map to class 0 in top-5
    targets = np.array([0, 1])
    probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.5, 0.2, 0.1, 0.05, 0.05]])
    preds = probs.argmax(1)
    out = hungarian_evaluate(preds, targets, probs)
    assert out["match"] == [(0, 0), (1, 1)]
    # sample 0: top-5 = clusters 0,1,2,3,(4|5) -> mapped 0,1,0,0,0 -> 4 hits; sample 1: one hit
    assert out["acc_top5"] == pytest.approx(5 / 2)
    strict = hungarian_evaluate(preds, targets, probs, unmatched="wrong")
    assert strict["acc_top5"] == 1.0
    assert strict["acc"] == out["acc"] == 1.0


def test_hungarian_empty_cluster():
    # cluster 1 is never predicted; K = 3
    preds, targets = np.array([0, 0, 2, 2, 2, 0]), np.array([1, 1, 0, 0, 2, 2])
    out = hungarian_evaluate(preds, targets, return_reordered=True)
    assert out["acc"] == pytest.approx(ref_scan_acc(preds, targets)) == pytest.approx(4 / 6)
    assert out["confusion"].sum().item() == 6


def test_hungarian_labels_not_starting_at_zero():
    # labels {1, 2}: K = 2 so only class ids 0 and 1 enter the matching; label 2 is never matched
    preds, targets = np.array([0, 0, 1, 1]), np.array([1, 1, 2, 2])
    out = hungarian_evaluate(preds, targets)
    assert out["acc"] == pytest.approx(ref_scan_acc(preds, targets)) == 0.5
    assert out["nmi"] == pytest.approx(1.0) and out["ari"] == pytest.approx(1.0)
    # labels {3, 4, 5}: no label is a matchable class id -> ACC 0 while NMI = 1
    out = hungarian_evaluate(np.array([0, 1, 2]), np.array([3, 4, 5]))
    assert out["acc"] == 0.0 and out["nmi"] == pytest.approx(1.0)


def test_hungarian_all_one_class():
    out = hungarian_evaluate(np.zeros(5, dtype=int), np.zeros(5, dtype=int))
    assert out["acc"] == 1.0 and out["nmi"] == pytest.approx(1.0) and out["ari"] == pytest.approx(1.0)
    out = hungarian_evaluate(np.array([0, 1, 2, 0, 1]), np.full(5, 0))
    assert out["acc"] == pytest.approx(ref_scan_acc(np.array([0, 1, 2, 0, 1]), np.full(5, 0)))
    # predictions 1 and 2 (>= K = 1) map to class 0 under the official zero-fill
    assert out["acc"] == 1.0


def test_hungarian_torch_and_numpy_agree():
    preds, targets = random_case(300, 5, seed=4, extra_clusters=2)
    rng = np.random.default_rng(0)
    probs = rng.random((300, 7)).astype(np.float32)
    a = hungarian_evaluate(preds, targets, probs, return_reordered=True)
    b = hungarian_evaluate(torch.from_numpy(preds), torch.from_numpy(targets), torch.from_numpy(probs), return_reordered=True)
    for key in ("acc", "nmi", "ari", "acc_top5", "match"):
        assert a[key] == b[key]
    assert torch.equal(a["confusion"], b["confusion"]) and torch.equal(a["reordered"], b["reordered"])
    assert a["acc"] == pytest.approx(ref_scan_acc(preds, targets))


def test_hungarian_match_is_optimal_under_ties():
    preds, targets = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    out = hungarian_evaluate(preds, targets, np.eye(4)[[0, 1, 0, 1]] + 0.01 * np.arange(4))
    assert out["acc"] == 0.5
    assert len(out["match"]) == 2


def test_hungarian_confusion_matches_reordered():
    preds, targets = random_case(120, 4, seed=8)
    out = hungarian_evaluate(preds, targets, return_reordered=True)
    conf = np.zeros((4, 4), dtype=int)
    for t, r in zip(targets, out["reordered"].numpy()):
        conf[t, r] += 1
    assert out["confusion"].numpy().tolist() == conf.tolist()
    assert np.trace(conf) / 120 == pytest.approx(out["acc"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(predictions=np.array([0, 1]), targets=np.array([0, 1, 1])),
        dict(predictions=np.zeros((2, 2), dtype=int), targets=np.zeros((2, 2), dtype=int)),
        dict(predictions=np.array([0.5, 1.0]), targets=np.array([0, 1])),
        dict(predictions=np.array([], dtype=int), targets=np.array([], dtype=int)),
        dict(predictions=np.array([0, 1]), targets=np.array([0, 1]), probabilities=np.ones((3, 5))),
        dict(predictions=np.array([0, 1]), targets=np.array([0, 1]), unmatched="nope"),
    ],
)
def test_hungarian_bad_input(kwargs):
    with pytest.raises(NcdError):
        hungarian_evaluate(**kwargs)


# ----------------------------------------------------------------------------- scan_head_losses


def make_probs(h: int, n: int, k: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(h, n, k, generator=g) * scale, dim=-1)


def make_neighbors(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    others = torch.randint(0, n, (n, k), generator=g)
    return torch.cat([torch.arange(n).view(-1, 1), others], 1)


@pytest.mark.parametrize("h", [1, 3])
@pytest.mark.parametrize("n", [5, 40])
@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("nn_", [1, 5])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_head_losses_match_reference(h, n, k, nn_, scale):
    probs = make_probs(h, n, k, seed=h * 1000 + n * 10 + k, scale=scale)
    nbrs = make_neighbors(n, nn_, seed=n + nn_)
    out = scan_head_losses(probs, nbrs)
    ents, conss, tots = ref_head_losses(probs.double().numpy(), nbrs.numpy())
    for key in ("entropy", "consistency", "total"):
        assert out[key].shape == (h,) and out[key].is_floating_point()
    np.testing.assert_allclose(out["entropy"].numpy(), ents, rtol=1e-5)
    np.testing.assert_allclose(out["consistency"].numpy(), conss, rtol=1e-5)
    np.testing.assert_allclose(out["total"].numpy(), tots, rtol=1e-4, atol=1e-5)
    assert out["best_head"] == int(np.argmin(out["total"].numpy()))
    assert isinstance(out["best_head"], int)


def test_head_losses_gather_path_equals_full_matrix(monkeypatch):
    probs = make_probs(3, 60, 7, seed=1)
    nbrs = make_neighbors(60, 5, seed=2)
    full = scan_head_losses(probs, nbrs)
    monkeypatch.setattr(clustering, "_FULL_MATRIX_MAX_N", 10)
    monkeypatch.setattr(clustering, "_GATHER_CHUNK_ELEMS", 100)  # many small chunks
    gathered = scan_head_losses(probs, nbrs)
    for key in ("entropy", "consistency", "total"):
        torch.testing.assert_close(gathered[key], full[key], rtol=1e-6, atol=1e-7)
    # the same head, unless two heads' totals tie within that tolerance (then either is a minimum)
    total = full["total"].double()
    tie = 1e-6 * float(total.abs().max()) + 1e-7
    assert float(total[gathered["best_head"]]) <= float(total.min()) + tie
    if int((total <= total.min() + tie).sum()) == 1:
        assert gathered["best_head"] == full["best_head"]
    ents, conss, tots = ref_head_losses(probs.double().numpy(), nbrs.numpy())
    np.testing.assert_allclose(gathered["consistency"].numpy(), conss, rtol=1e-5)


def test_head_losses_hand_computed():
    # two samples, uniform over 2 classes, neighbour table [[0, 1], [1, 0]]: every <p,q> = 1/2
    p = torch.full((1, 2, 2), 0.5)
    out = scan_head_losses(p, torch.tensor([[0, 1], [1, 0]]))
    assert out["entropy"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert out["consistency"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert out["total"].item() == pytest.approx(0.0, abs=1e-6)


def test_head_losses_self_pairs_count_and_best_head():
    # head 0: one-hot, consistent neighbours (cons 0); head 1: uniform (cons log K, entropy log K)
    onehot = torch.eye(3)[[0, 0, 1, 1, 2, 2]]
    uniform = torch.full((6, 3), 1 / 3)
    nbrs = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2], [4, 5], [5, 4]])
    out = scan_head_losses(torch.stack([uniform, onehot]), nbrs)
    assert out["consistency"][1].item() == pytest.approx(0.0, abs=1e-6)
    assert out["entropy"][1].item() == pytest.approx(math.log(3), rel=1e-6)
    assert out["total"][0].item() == pytest.approx(0.0, abs=1e-6)
    assert out["best_head"] == 1
    # a bad neighbour for a one-hot head: <p,q> = 0 -> the -100 clamp: (100 + 0 + ...)/12
    nbrs_bad = nbrs.clone()
    nbrs_bad[0, 1] = 2
    bad = scan_head_losses(onehot, nbrs_bad)
    assert bad["consistency"].item() == pytest.approx(100 / 12, rel=1e-6)
    assert torch.isfinite(bad["total"]).all()


def test_head_losses_ties_pick_first_head():
    p = make_probs(1, 10, 4, seed=3)
    out = scan_head_losses(torch.cat([p, p, p]), make_neighbors(10, 3, seed=4))
    assert out["best_head"] == 0
    assert out["total"][0] == out["total"][1] == out["total"][2]


def test_head_losses_similarity_above_one_is_clamped():
    # float error can push <p,p> just above 1; the official BCE would reject it
    p = torch.tensor([[[1.0000005]], [[1.0]]]).transpose(0, 1)  # [1, 2, 1]
    out = scan_head_losses(p, torch.tensor([[0, 1], [1, 0]]))
    assert out["consistency"].item() == pytest.approx(0.0, abs=1e-6)


def test_head_losses_accepts_numpy_and_2d():
    probs = make_probs(1, 12, 3, seed=5)
    nbrs = make_neighbors(12, 2, seed=6)
    a = scan_head_losses(probs, nbrs)
    b = scan_head_losses(probs[0].numpy(), nbrs.numpy())
    torch.testing.assert_close(a["total"], b["total"])


@pytest.mark.parametrize(
    "probs,nbrs",
    [
        (torch.full((1, 3, 2), 0.5), torch.tensor([[0, 1], [1, 2]])),  # wrong N
        (torch.full((1, 3, 2), 0.5), torch.tensor([[0, 1], [1, 2], [2, 3]])),  # out of range
        (torch.full((1, 3, 2), 0.5), torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 0.0]])),  # float idx
        (torch.full((3, 2), 1, dtype=torch.long), torch.tensor([[0], [1], [2]])),  # int probs
        (torch.full((1, 1, 3, 2), 0.5), torch.tensor([[0], [1], [2]])),
    ],
)
def test_head_losses_bad_input(probs, nbrs):
    with pytest.raises(NcdError):
        scan_head_losses(probs, nbrs)


# ----------------------------------------------------------------------------- cluster_acc


@pytest.mark.parametrize("n", [7, 50, 300])
@pytest.mark.parametrize("k", [2, 4, 6])
@pytest.mark.parametrize("extra", [0, 1])
def test_cluster_acc_matches_reference(n, k, extra):
    preds, targets = random_case(n, k, seed=n + 17 * k + extra, noise=0.5, extra_clusters=extra)
    got = cluster_acc(targets, preds)
    assert isinstance(got, float)
    assert got == pytest.approx(ref_cluster_acc(targets, preds), abs=1e-12)
    assert cluster_acc(torch.from_numpy(targets), torch.from_numpy(preds)) == got


def test_cluster_acc_hand_computed():
    # D = 3; w[1,0] = 2, w[0,1] = 1, w[0,2] = 1 -> 3 of 4
    assert cluster_acc(np.array([0, 0, 1, 2]), np.array([1, 1, 0, 0])) == 0.75
    assert cluster_acc(np.array([0, 1, 2]), np.array([2, 0, 1])) == 1.0


def test_cluster_acc_differs_from_scan_protocol():
    # UNO matches every id (square on max id); SCAN zero-fills clusters >= K
    y, p = np.array([0, 0, 1, 1]), np.array([2, 2, 1, 1])
    assert cluster_acc(y, p) == 1.0
    assert hungarian_evaluate(p, y)["acc"] == 1.0  # 2 -> 0 by the zero-fill
    y, p = np.array([1, 1, 0, 0]), np.array([2, 2, 1, 1])
    assert cluster_acc(y, p) == 1.0
    assert hungarian_evaluate(p, y)["acc"] == 0.5


def test_cluster_acc_labels_not_starting_at_zero_and_empty_clusters():
    y, p = np.array([5, 5, 6, 6]), np.array([0, 0, 3, 3])
    assert cluster_acc(y, p) == pytest.approx(ref_cluster_acc(y, p)) == 1.0
    y, p = np.array([0, 0, 0]), np.array([0, 0, 0])
    assert cluster_acc(y, p) == 1.0


@pytest.mark.parametrize(
    "y,p", [(np.array([0, 1]), np.array([0])), (np.array([-1, 0]), np.array([0, 0])), (np.array([], dtype=int), np.array([], dtype=int))]
)
def test_cluster_acc_bad_input(y, p):
    with pytest.raises(NcdError):
        cluster_acc(y, p)
