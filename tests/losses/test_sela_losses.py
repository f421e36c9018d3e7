"""SeLa's label step (sela_sinkhorn, sela_label_step, sela_cost) vs NumPy transcriptions of METHODS.md 2.3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncd.errors import NcdError
from ncd.losses import sela_cost, sela_label_step, sela_sinkhorn
from ncd.losses.sela import label_step_plan

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- references
def ref_sk(p: np.ndarray, lamb: float, tol: float, every: int):
    """A = (Pᵀ)^λ; c = 1/N; repeat r = (1/K)/(A c), c_new = (1/N)/(Aᵀ r), err every `every` iterations."""
    n, k = p.shape
    a = p.T.copy() ** lamb
    c = np.full(n, 1.0 / n)
    r = np.full(k, 1.0 / k)
    err, it = 1e6, 0
    while err > tol:
        r = (1.0 / k) / (a @ c)
        c_new = (1.0 / n) / (a.T @ r)
        if it % every == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        it += 1
    q = a * c[None, :] * r[:, None]
    return q.argmax(0), r, c, it, q


def probs(n: int, k: int, seed: int, scale: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)) * scale
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


#: two assignment scores closer than this (relative) are a tie up to rounding: the summation order
#: (BLAS, threads, chunking, device) may pick either, so either is accepted as the argmax
TIE_RTOL = 1e-9


def assert_labels_are_argmax(labels, want: np.ndarray, q: np.ndarray, rtol: float = TIE_RTOL) -> None:
    """Every label is an argmax of its sample's reference assignment ``q[:, i]`` (``[K, N]``): the
    reference's own label ``want`` wherever its best score beats the runner-up by more than
    ``rtol``, and any score within ``rtol`` of the best where they tie up to rounding (e.g. N = 1,
    where Sinkhorn makes every cluster's score 1/K)."""
    labels = np.asarray(labels)
    k, n = q.shape
    assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < k
    best = q.max(0)
    picked = q[labels, np.arange(n)]
    np.testing.assert_array_less(best - picked, rtol * best + 1e-300, err_msg="a label is not a maximal score")
    runner_up = np.sort(q, axis=0)[-2] if k > 1 else np.full(n, -np.inf)
    clear = best - runner_up > rtol * best
    np.testing.assert_array_equal(labels[clear], want[clear])


def py_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(1, keepdims=True)
    return np.exp(x - (m + np.log(np.exp(x - m).sum(1, keepdims=True))))


# ----------------------------------------------------------------------------- sela_sinkhorn
@pytest.mark.parametrize("n,k", [(1, 1), (1, 5), (7, 1), (50, 3), (300, 10), (1000, 37)])
@pytest.mark.parametrize("lamb,tol", [(25.0, 0.1), (10.0, 0.01), (5.0, 0.1)])
@pytest.mark.parametrize("every", [1, 10])
def test_sinkhorn_matches_reference(n, k, lamb, tol, every):
    p = probs(n, k, seed=n + k)
    labels, r, c, info = sela_sinkhorn(p, lamb, tol, every, return_info=True)
    want_l, want_r, want_c, want_it, q = ref_sk(p, lamb, tol, every)
    assert labels.dtype == torch.int64 and labels.shape == (n,)
    assert r.dtype == c.dtype == torch.float64 and r.shape == (k,) and c.shape == (n,)
    assert_labels_are_argmax(labels.numpy(), want_l, q)
    np.testing.assert_allclose(r.numpy(), want_r, rtol=1e-10)
    np.testing.assert_allclose(c.numpy(), want_c, rtol=1e-10)
    assert info["iterations"] == want_it
    # the official quirk: the loop can only stop right after a checked iteration
    assert (info["iterations"] - 1) % every == 0
    assert info["error"] <= tol


@pytest.mark.parametrize("n,k,lamb,tol", [(400, 8, 25.0, 0.1), (900, 30, 10.0, 0.01)])
def test_result_is_an_equipartition(n, k, lamb, tol):
    """Q = diag(r) A diag(c): columns sum to 1/N exactly, rows to about 1/K; hard labels are near-equal sizes."""
    p = probs(n, k, seed=3)
    labels, r, c = sela_sinkhorn(p, lamb, tol)
    q = (p.T ** lamb) * c.numpy()[None, :] * r.numpy()[:, None]
    np.testing.assert_allclose(q.sum(0), 1.0 / n, rtol=1e-9)
    np.testing.assert_allclose(q.sum(1) * k, 1.0, atol=0.05)
    sizes = np.bincount(labels.numpy(), minlength=k)
    assert sizes.min() > 0.5 * n / k and sizes.max() < 1.5 * n / k
    # without the constraint (plain argmax) the same scores collapse onto few clusters
    skewed = probs(n, k, seed=4) * np.geomspace(1, 1000, k)[None, :]
    skewed /= skewed.sum(1, keepdims=True)
    assert np.bincount(skewed.argmax(1), minlength=k).max() > 2 * n / k
    sizes = np.bincount(sela_sinkhorn(skewed, lamb, tol)[0].numpy(), minlength=k)
    assert sizes.max() < 1.5 * n / k


def test_input_is_never_modified_numpy_and_tensor():
    p = probs(200, 6, seed=1)
    keep = p.copy()
    sela_sinkhorn(p)
    np.testing.assert_array_equal(p, keep)
    t = torch.from_numpy(p.copy())
    sela_sinkhorn(t, storage="float32")
    sela_sinkhorn(t, storage="recompute")
    np.testing.assert_array_equal(t.numpy(), keep)


def test_numpy_and_tensor_inputs_agree():
    p = probs(300, 9, seed=2)
    a = sela_sinkhorn(p)
    b = sela_sinkhorn(torch.from_numpy(p))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("chunk", [1, 13, 64, 10_000])
def test_chunking_does_not_change_the_result(chunk):
    p = probs(500, 12, seed=5)
    labels, r, c, info = sela_sinkhorn(p, chunk_size=chunk, return_info=True)
    want_l, want_r, want_c, want_it, q = ref_sk(p, 25.0, 0.1, 10)
    assert_labels_are_argmax(labels.numpy(), want_l, q)
    np.testing.assert_allclose(r.numpy(), want_r, rtol=1e-10)
    np.testing.assert_allclose(c.numpy(), want_c, rtol=1e-10)
    assert info["iterations"] == want_it and info["chunk_size"] == chunk


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("storage", ["float64", "recompute"])
def test_cpu_threads_split_the_rows_without_changing_the_result(threads, storage):
    """Several CPU threads each sweep a range of rows; results as the reference, errors still raised."""
    p = probs(700, 15, seed=12)
    want_l, want_r, want_c, want_it, q = ref_sk(p, 25.0, 0.1, 10)
    torch.set_num_threads(threads)
    labels, r, c, info = sela_sinkhorn(p, storage=storage, chunk_size=50, return_info=True)
    assert info["threads"] == threads and torch.get_num_threads() == threads
    assert_labels_are_argmax(labels.numpy(), want_l, q)
    np.testing.assert_allclose(r.numpy(), want_r, rtol=1e-10)
    np.testing.assert_allclose(c.numpy(), want_c, rtol=1e-10)
    assert info["iterations"] == want_it
    p[650, 3] = np.nan  # in the last thread's range
    with pytest.raises(NcdError, match="NaN"):
        sela_sinkhorn(p, storage=storage, chunk_size=50)


@pytest.mark.parametrize("storage", ["recompute", "float32"])
def test_storages_agree_with_float64(storage):
    p = probs(2000, 50, seed=6)
    l64, r64, c64, i64 = sela_sinkhorn(p, return_info=True)
    lx, rx, cx, ix = sela_sinkhorn(p, storage=storage, return_info=True)
    if storage == "recompute":  # the same float64 values, only not stored: identical
        assert torch.equal(l64, lx) and ix["iterations"] == i64["iterations"]
        assert ix["matrix_bytes"] == 0
        np.testing.assert_allclose(rx.numpy(), r64.numpy(), rtol=1e-12)
    else:  # float32 entries (rescaled to [0, 1]), float64 accumulation: half the memory, labels (nearly) equal
        assert ix["matrix_bytes"] == i64["matrix_bytes"] // 2
        assert float((lx == l64).double().mean()) >= 0.99
        np.testing.assert_allclose(rx.numpy(), r64.numpy(), rtol=1e-4)
        np.testing.assert_allclose(cx.numpy(), c64.numpy(), rtol=1e-4)


def test_float32_storage_keeps_tiny_powers():
    """λ = 25 puts P^λ near 1e-200, far below float32's range; the rescaling keeps them usable."""
    p = probs(300, 20, seed=7, scale=4.0)
    assert (p.T ** 25).min() < 1e-100
    l64 = sela_sinkhorn(p)[0]
    l32 = sela_sinkhorn(p, storage="float32")[0]
    assert float((l64 == l32).double().mean()) >= 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_device_gives_the_same_labels(device):
    p = probs(800, 25, seed=8)
    want_l, _, _, _, q = ref_sk(p, 25.0, 0.1, 10)
    labels, r, c = sela_sinkhorn(p, device=device)
    assert labels.device.type == device
    assert_labels_are_argmax(labels.cpu().numpy(), want_l, q)  # a GPU sums in another order
    t = torch.from_numpy(p).to(device)
    assert sela_sinkhorn(t)[0].device.type == device


def test_no_iteration_when_tol_is_above_the_initial_error():
    """As upstream (err starts at 1e6): no iteration, labels from r = 1/K, c = 1/N, i.e. argmax of P."""
    p = probs(100, 7, seed=9)
    labels, r, c, info = sela_sinkhorn(p, tol=1e6, return_info=True)
    assert info["iterations"] == 0
    assert_labels_are_argmax(labels.numpy(), p.argmax(1), p.T ** 25.0 / (100 * 7))
    np.testing.assert_allclose(r.numpy(), 1 / 7)


def test_float32_input_is_promoted():
    p = probs(200, 5, seed=10).astype(np.float32)
    labels, r, c = sela_sinkhorn(p)
    want_l, want_r, _, _, q = ref_sk(p.astype(np.float64), 25.0, 0.1, 10)
    assert_labels_are_argmax(labels.numpy(), want_l, q)
    np.testing.assert_allclose(r.numpy(), want_r, rtol=1e-10)


@pytest.mark.parametrize("bad,match", [
    (np.ones(5), "2-D"),
    (np.ones((0, 3)), "non-empty"),
    (np.ones((4, 3), dtype=np.int64), "floating point"),
    ([[0.5, 0.5]], "NumPy array or a torch tensor"),
    (np.array([[0.5, -0.1], [0.5, 0.5]]), "negative, NaN or infinite"),
    (np.array([[0.5, np.nan], [0.5, 0.5]]), "negative, NaN or infinite"),
    (np.array([[0.5, np.inf], [0.5, 0.5]]), "negative, NaN or infinite"),
    (np.array([[0.0, 0.0], [0.5, 0.5]]), "sample 0 has P\\^λ = 0"),
    (np.array([[1.0, 0.0], [1.0, 0.0]]), "cluster 1 has P\\^λ = 0"),
])
def test_bad_probs_raise(bad, match):
    with pytest.raises(NcdError, match=match):
        sela_sinkhorn(bad)


@pytest.mark.parametrize("kwargs,match", [
    ({"lamb": 0}, "lamb"), ({"lamb": float("inf")}, "lamb"), ({"tol": -1}, "tol"),
    ({"check_every": 0}, "check_every"), ({"check_every": 2.0}, "check_every"),
    ({"storage": "float16"}, "storage"), ({"chunk_size": 0}, "chunk_size"), ({"device": "nope"}, "device"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(NcdError, match=match):
        sela_sinkhorn(probs(10, 3, seed=0), **kwargs)


# ----------------------------------------------------------------------------- the multi-head label step
@pytest.mark.parametrize("n,d,k", [(300, 16, 10), (1000, 8, 40)])
@pytest.mark.parametrize("storage", ["float64", "recompute"])
def test_label_step_from_features_matches_reference(n, d, k, storage):
    rng = np.random.default_rng(n + d)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(k, d)).astype(np.float32)
    b = rng.normal(size=k).astype(np.float32)
    # the official multi-head path: float64 features @ W.T + b, then py_softmax
    p = py_softmax(feats.astype(np.float64) @ w.T.astype(np.float64) + b.astype(np.float64))
    want_l, want_r, want_c, want_it, q = ref_sk(p, 25.0, 0.1, 10)
    labels, r, c, info = sela_label_step(torch.from_numpy(feats), torch.from_numpy(w), torch.from_numpy(b),
                                         storage=storage, chunk_size=97, return_info=True)
    assert_labels_are_argmax(labels.numpy(), want_l, q)
    np.testing.assert_allclose(r.numpy(), want_r, rtol=1e-9)
    np.testing.assert_allclose(c.numpy(), want_c, rtol=1e-9)
    assert info["iterations"] == want_it


def test_label_step_checks_shapes():
    f = torch.randn(10, 4)
    with pytest.raises(NcdError, match="weight must be"):
        sela_label_step(f, torch.randn(3, 5), None)
    with pytest.raises(NcdError, match="bias must be"):
        sela_label_step(f, torch.randn(3, 4), torch.randn(4))
    labels, _, _ = sela_label_step(f, torch.randn(3, 4), None)
    assert labels.shape == (10,)


# ----------------------------------------------------------------------------- cost and memory plan
@pytest.mark.parametrize("n,k", [(20, 4), (300, 30)])
def test_cost_is_the_cifar_scripts(n, k):
    p = probs(n, k, seed=11)
    labels, r, c, info = sela_sinkhorn(p, 10.0, 0.01, return_info=True)
    _, _, _, _, q = ref_sk(p, 10.0, 0.01, 10)
    # cifar.py: undo the scaling, take the chosen entries of P^λ, -(1/λ) nansum(log) / N
    a = q / np.asarray(r)[:, None] / np.asarray(c)[None, :]
    want = -(1.0 / 10.0) * np.nansum(np.log(a[labels.numpy(), np.arange(n)])) / n
    got = sela_cost(p, labels)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert float(got) == pytest.approx(want, rel=1e-9)
    with pytest.raises(NcdError, match="labels must lie"):
        sela_cost(p, torch.full((n,), k))
    with pytest.raises(NcdError, match="labels must be"):
        sela_cost(p, torch.zeros(n + 1, dtype=torch.long))


def test_memory_plan_picks_what_fits():
    n, k, d = 1_281_167, 3000, 4096
    full = label_step_plan(n, k, 0, "auto", d)
    assert full["storage"] == "float64" and full["matrix_bytes"] == 8 * n * k
    assert label_step_plan(n, k, 64_000, "auto", d)["storage"] == "float64"
    assert label_step_plan(n, k, 40_000, "auto", d)["storage"] == "float32"
    assert label_step_plan(n, k, 25_000, "auto", d)["storage"] == "recompute"
    with pytest.raises(NcdError, match="memory budget"):
        label_step_plan(n, k, 10_000, "auto", d)
    with pytest.raises(NcdError, match="memory budget"):
        label_step_plan(n, k, 20_000, "float64", 0)
