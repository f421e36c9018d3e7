"""CLD's losses against hand-written NumPy versions of their formulas (METHODS.md 5.3-5.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncd.errors import NcdError
from ncd.losses import batch_kmeans, cld_loss, enqueue, memory_bank_update, moco_logits, npid_loss


# ------------------------------------------------------------------------------ NumPy references
#: scores closer than this are a tie up to rounding (another summation order may pick either)
TIE_ATOL = 1e-9


def margin(scores: np.ndarray, centroids: np.ndarray, lowest: bool) -> float:
    """The smallest gap, over the rows of ``scores`` ``[B, K]``, between the best column (lowest or
    highest) and the best column whose centroid differs from the winner's. Identical centroids (the
    zero vectors of empty clusters) tie exactly in every implementation, and both take the first."""
    gaps = [np.inf]
    for row in scores:
        win = int(np.argmin(row) if lowest else np.argmax(row))
        other = [j for j in range(len(row)) if not np.array_equal(centroids[j], centroids[win])]
        if other:
            gaps.append(float(np.min(np.abs(row[other] - row[win]))))
    return min(gaps)


def kmeans_ref(x: np.ndarray, k: int, iters: int, gaps: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The official loop written out: first-K init, squared distances, first minimum wins,
    plain means, zero vector for an empty cluster. ``gaps`` collects each assignment's :func:`margin`."""
    c = x[:k].copy()
    labels = None
    for _ in range(iters):
        dist = np.array([[np.sum((xi - cj) ** 2) for cj in c] for xi in x])
        labels = np.array([int(np.argmin(row)) for row in dist])  # np.argmin: first minimum
        if gaps is not None:
            gaps.append(margin(dist, c, lowest=True))
        new = np.zeros((k, x.shape[1]))
        for j in range(k):
            members = x[labels == j]
            if len(members):
                new[j] = members.mean(axis=0)
        c = new
    return labels, c


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def ce(logits: np.ndarray, target: np.ndarray) -> float:
    return float(-log_softmax(logits)[np.arange(len(target)), target].mean())


def centroids_of(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    c = np.zeros((k, x.shape[1]))
    for j in range(k):
        if (labels == j).any():
            c[j] = x[labels == j].mean(axis=0)
    return c


def cld_ref(f1, f2, l1, l2, k, tau, c1=None, c2=None) -> float:
    """L = ½[CE(f1 c2ᵀ/τ, Γ2) + CE(f2 c1ᵀ/τ, Γ1)] for fixed labels; the centroids are the means of
    the features unless given (the detached mode)."""
    c1 = centroids_of(f1, l1, k) if c1 is None else c1
    c2 = centroids_of(f2, l2, k) if c2 is None else c2
    return 0.5 * (ce(f1 @ c2.T / tau, l2) + ce(f2 @ c1.T / tau, l1))


def unit(g: np.random.Generator, b: int, d: int) -> np.ndarray:
    x = g.normal(size=(b, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def untied_unit(g: np.random.Generator, b: int, d: int, k: int, iters: int, views: int = 1) -> list[np.ndarray]:
    """``views`` batches of unit rows whose k-means assignments (and, for two views, the cross-view
    nearest centroids of the group accuracy) have no near-tie: a draw with a gap below
    :data:`TIE_ATOL` is redrawn, so the exact label comparisons do not hang on rounding."""
    for _ in range(100):
        xs = [unit(g, b, d) for _ in range(views)]
        gaps: list[float] = []
        cents = [kmeans_ref(x, k, iters, gaps)[1] for x in xs]
        if views == 2:
            gaps.append(margin(xs[0] @ cents[1].T, cents[1], lowest=False))
        if min(gaps) > TIE_ATOL:
            return xs
    raise AssertionError(f"no tie-free draw of {views} x [{b}, {d}] for k={k} in 100 tries")


# ----------------------------------------------------------------------------------- batch_kmeans
@pytest.mark.parametrize("b,d,k", [(16, 4, 3), (64, 8, 10), (40, 16, 40), (9, 3, 12), (128, 32, 128)])
@pytest.mark.parametrize("iters", [1, 2, 5])
def test_kmeans_matches_numpy(b, d, k, iters):
    g = np.random.default_rng(b * 100 + d * 10 + k + iters)
    (x,) = untied_unit(g, b, d, k, iters)
    labels, c = batch_kmeans(torch.tensor(x), k, iters)
    want_l, want_c = kmeans_ref(x, k, iters)
    assert labels.dtype == torch.int64 and labels.shape == (b,)
    assert c.shape == (k, d) and c.dtype == torch.float64
    np.testing.assert_array_equal(labels.numpy(), want_l)
    np.testing.assert_allclose(c.numpy(), want_c, rtol=1e-12, atol=1e-12)


def test_kmeans_tie_goes_to_the_lowest_index():
    # the third point is exactly halfway between the two initial centroids
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels, c = batch_kmeans(x, 2, iters=1)
    assert labels.tolist() == [0, 1, 0]
    torch.testing.assert_close(c, torch.tensor([[0.5, 0.0], [2.0, 0.0]], dtype=torch.float64))


def test_empty_cluster_gets_the_zero_vector_and_can_win_later():
    # identical first rows: every point ties and goes to cluster 0, cluster 1 is empty
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    labels, c = batch_kmeans(x, 2, iters=1)
    assert labels.tolist() == [0, 0, 0]
    torch.testing.assert_close(c[1], torch.zeros(2, dtype=torch.float64))  # not re-normalised, not NaN
    torch.testing.assert_close(c[0], torch.tensor([5 / 3, 5 / 3], dtype=torch.float64))
    # the zero centroid takes part in the next assignment: the two origin points move to it
    labels, c = batch_kmeans(x, 2, iters=2)
    assert labels.tolist() == [1, 1, 0]
    torch.testing.assert_close(c, torch.tensor([[5.0, 5.0], [0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("b,k", [(3, 5), (6, 120), (1, 2)])
def test_fewer_rows_than_clusters(b, k):
    g = np.random.default_rng(b + k)
    x = unit(g, b, 4)
    labels, c = batch_kmeans(torch.tensor(x), k, iters=5)
    assert labels.tolist() == list(range(b))  # every row its own cluster
    np.testing.assert_allclose(c[:b].numpy(), x, rtol=1e-12)
    assert torch.count_nonzero(c[b:]) == 0
    want_l, want_c = kmeans_ref(x, k, 5)
    np.testing.assert_array_equal(labels.numpy(), want_l)
    np.testing.assert_allclose(c.numpy(), want_c, atol=1e-12)


def test_kmeans_centroids_are_differentiable_means():
    g = np.random.default_rng(0)
    x = torch.tensor(unit(g, 20, 5), requires_grad=True)
    labels, c = batch_kmeans(x, 4, iters=3)
    r = torch.tensor(g.normal(size=(4, 5)))
    (c * r).sum().backward()
    counts = torch.bincount(labels, minlength=4).double()
    want = r[labels] / counts[labels, None]  # d c_k / d x_i = 1/|S_k| for the members of k
    torch.testing.assert_close(x.grad, want)


def test_kmeans_bad_input():
    with pytest.raises(NcdError, match="num_clusters must be an integer >= 1"):
        batch_kmeans(torch.zeros(4, 2), 0)
    with pytest.raises(NcdError, match="iters must be an integer >= 1"):
        batch_kmeans(torch.zeros(4, 2), 2, iters=0)
    with pytest.raises(NcdError, match="x must have 2 dimensions"):
        batch_kmeans(torch.zeros(4), 2)
    with pytest.raises(NcdError, match="floating-point"):
        batch_kmeans(torch.zeros(4, 2, dtype=torch.long), 2)


# --------------------------------------------------------------------------------------- cld_loss
@pytest.mark.parametrize("b,d,k", [(32, 8, 4), (64, 16, 10), (20, 8, 30)])
@pytest.mark.parametrize("tau", [0.2, 0.4, 0.8])
def test_cld_loss_value_matches_numpy(b, d, k, tau):
    g = np.random.default_rng(b + d + k + int(10 * tau))
    f1, f2 = untied_unit(g, b, d, k, 5, views=2)
    out = cld_loss(torch.tensor(f1), torch.tensor(f2), k, temperature=tau, iters=5)
    l1, c1 = kmeans_ref(f1, k, 5)
    l2, c2 = kmeans_ref(f2, k, 5)
    np.testing.assert_array_equal(out["labels1"].numpy(), l1)
    np.testing.assert_array_equal(out["labels2"].numpy(), l2)
    np.testing.assert_allclose(out["centroids1"].detach().numpy(), c1, atol=1e-12)
    np.testing.assert_allclose(out["centroids2"].detach().numpy(), c2, atol=1e-12)
    assert out["loss"].item() == pytest.approx(cld_ref(f1, f2, l1, l2, k, tau), rel=1e-10)
    # group acc: view-1 rows whose nearest view-2 centroid (by dot product) is their view-2 cluster
    acc = np.mean(np.argmax(f1 @ c2.T, axis=1) == l2)
    assert float(out["group_acc"]) == pytest.approx(acc)
    assert set(out) == {"loss", "labels1", "labels2", "centroids1", "centroids2", "group_acc"}


def _numeric_grad(fn, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        grad[idx] = (fn(xp) - fn(xm)) / (2 * eps)
    return grad


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("b,d,k", [(12, 4, 3), (8, 3, 10)])
def test_cld_loss_gradient_both_modes(detach, b, d, k):
    """Through the centroids (default) or with the centroids as constants: autograd equals the
    finite differences of the NumPy formula (the labels stay fixed under a tiny step)."""
    g = np.random.default_rng(b * d * k + detach)
    f1, f2 = unit(g, b, d), unit(g, b, d)
    t1, t2 = torch.tensor(f1, requires_grad=True), torch.tensor(f2, requires_grad=True)
    out = cld_loss(t1, t2, k, temperature=0.3, detach_centroids=detach)
    out["loss"].backward()
    l1, l2 = out["labels1"].numpy(), out["labels2"].numpy()
    c1, c2 = (centroids_of(f1, l1, k), centroids_of(f2, l2, k)) if detach else (None, None)
    num1 = _numeric_grad(lambda a: cld_ref(a, f2, l1, l2, k, 0.3, c1, c2), f1)
    num2 = _numeric_grad(lambda a: cld_ref(f1, a, l1, l2, k, 0.3, c1, c2), f2)
    np.testing.assert_allclose(t1.grad.numpy(), num1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(t2.grad.numpy(), num2, rtol=1e-5, atol=1e-7)
    if detach:
        assert not out["centroids1"].requires_grad and not out["centroids2"].requires_grad


def test_cld_loss_modes_differ_and_bad_input():
    g = np.random.default_rng(1)
    f1, f2 = unit(g, 16, 4), unit(g, 16, 4)
    grads = []
    for detach in (False, True):
        t1 = torch.tensor(f1, requires_grad=True)
        cld_loss(t1, torch.tensor(f2), 3, detach_centroids=detach)["loss"].backward()
        grads.append(t1.grad)
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(NcdError, match="f1 and f2 must have the same shape"):
        cld_loss(torch.zeros(4, 2), torch.zeros(5, 2), 2)
    with pytest.raises(NcdError, match="temperature must be > 0"):
        cld_loss(torch.zeros(4, 2), torch.zeros(4, 2), 2, temperature=0.0)


# --------------------------------------------------------------------------------------- NPID
@pytest.mark.parametrize("n,d,b", [(50, 8, 10), (200, 16, 32), (20, 4, 20)])
@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5])
def test_npid_loss_matches_numpy_and_memory_is_constant(n, d, b, tau):
    g = np.random.default_rng(n + d + b)
    s = 1 / np.sqrt(d / 3)
    mem = g.uniform(-s, s, (n, d))
    v = unit(g, b, d)
    idx = g.permutation(n)[:b]
    tv, tm = torch.tensor(v, requires_grad=True), torch.tensor(mem, requires_grad=True)
    loss = npid_loss(tv, torch.tensor(idx), tm, temperature=tau)
    logits = v @ mem.T / tau
    assert loss.item() == pytest.approx(ce(logits, idx), rel=1e-10)
    loss.backward()
    p = np.exp(log_softmax(logits))
    p[np.arange(b), idx] -= 1
    np.testing.assert_allclose(tv.grad.numpy(), p @ mem / tau / b, rtol=1e-9, atol=1e-12)
    assert tm.grad is None  # the memory is a constant for the gradient


def test_two_view_npid_uses_the_pre_update_memory_and_updates_view2_then_view1():
    g = np.random.default_rng(3)
    n, d, b, m = 30, 6, 5, 0.5
    mem = g.uniform(-1, 1, (n, d))
    v1, v2 = unit(g, b, d), unit(g, b, d)
    idx = np.array([4, 9, 0, 17, 3])
    tm, t1, t2 = torch.tensor(mem), torch.tensor(v1), torch.tensor(v2)
    loss = 0.5 * (npid_loss(t1, torch.tensor(idx), tm) + npid_loss(t2, torch.tensor(idx), tm))
    want = 0.5 * (ce(v1 @ mem.T / 0.1, idx) + ce(v2 @ mem.T / 0.1, idx))
    assert loss.item() == pytest.approx(want, rel=1e-10)
    new = memory_bank_update(memory_bank_update(tm, t2, torch.tensor(idx), m), t1, torch.tensor(idx), m)
    ref = mem.copy()
    for j, i in enumerate(idx):
        r = m * mem[i] + (1 - m) * v2[j]
        r = r / np.linalg.norm(r)
        r = m * r + (1 - m) * v1[j]
        ref[i] = r / np.linalg.norm(r)
    np.testing.assert_allclose(new.numpy(), ref, rtol=1e-12)


def test_npid_bad_input():
    with pytest.raises(NcdError, match=r"index must lie in 0..9"):
        npid_loss(torch.zeros(2, 3), torch.tensor([0, 10]), torch.zeros(10, 3))
    with pytest.raises(NcdError, match="features have 4 columns but the memory has 3"):
        npid_loss(torch.zeros(2, 4), torch.tensor([0, 1]), torch.zeros(10, 3))
    with pytest.raises(NcdError, match="index must be an integer vector of length 2"):
        npid_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), torch.zeros(10, 3))


# --------------------------------------------------------------------------------------- MoCo
@pytest.mark.parametrize("b,q,d", [(4, 10, 3), (16, 64, 8), (8, 1, 5)])
@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_moco_logits_match_numpy(b, q, d, tau):
    g = np.random.default_rng(b * q + d)
    qq, kk, queue = unit(g, b, d), unit(g, b, d), unit(g, q, d)
    tq, tk = torch.tensor(qq, requires_grad=True), torch.tensor(kk, requires_grad=True)
    out = moco_logits(tq, tk, torch.tensor(queue), temperature=tau)
    want = np.concatenate([np.sum(qq * kk, axis=1, keepdims=True), qq @ queue.T], axis=1) / tau
    assert out.shape == (b, 1 + q)
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-12)
    torch.nn.functional.cross_entropy(out, torch.zeros(b, dtype=torch.long)).backward()
    assert tq.grad is not None and tk.grad is None  # keys are constants


@pytest.mark.parametrize("size,ptr,b", [(5, 3, 4), (8, 0, 8), (8, 6, 2), (7, 2, 1), (6, 5, 6)])
def test_enqueue_ring_buffer_wraps_around(size, ptr, b):
    g = np.random.default_rng(size + ptr + b)
    queue, keys = g.normal(size=(size, 3)), g.normal(size=(b, 3))
    tq = torch.tensor(queue)
    out, new_ptr = enqueue(tq, torch.tensor(keys), ptr)
    ref = queue.copy()
    for j in range(b):
        ref[(ptr + j) % size] = keys[j]
    np.testing.assert_array_equal(out.numpy(), ref)
    assert new_ptr == (ptr + b) % size
    assert torch.equal(tq, torch.tensor(queue))  # the input queue is not modified
    out2, ptr2 = enqueue(out, torch.tensor(keys), torch.tensor([new_ptr]))  # a tensor pointer works too
    assert ptr2 == (ptr + 2 * b) % size


def test_enqueue_bad_input():
    with pytest.raises(NcdError, match="6 keys do not fit a queue of 5"):
        enqueue(torch.zeros(5, 2), torch.zeros(6, 2), 0)
    with pytest.raises(NcdError, match=r"ptr must lie in 0..4, got 5"):
        enqueue(torch.zeros(5, 2), torch.zeros(1, 2), 5)
    with pytest.raises(NcdError, match="expected the queue as"):
        moco_logits(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2))
