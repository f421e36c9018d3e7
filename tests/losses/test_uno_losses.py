"""UNO losses vs hand-written NumPy references of METHODS.md 3.3 (written independently here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncd.errors import NcdError
from ncd.losses.uno import sinkhorn_knopp, swapped_prediction, uno_loss

# ----------------------------------------------------------------------------- references


def ref_sk(logits: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Q = exp(l/eps)^T / total; iters x (rows -> 1/K, cols -> 1/B); return (B Q)^T. float64 loops."""
    b, k = logits.shape
    q = np.zeros((k, b))
    for i in range(b):
        for j in range(k):
            q[j, i] = math.exp(float(logits[i, j]) / eps)
    q = q / q.sum()
    for _ in range(iters):
        for j in range(k):
            q[j, :] = q[j, :] / q[j, :].sum() / k
        for i in range(b):
            q[:, i] = q[:, i] / q[:, i].sum() / b
    return (b * q).T


def ref_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


def ref_swapped(logits: np.ndarray, targets: np.ndarray, n_large: int, t: float) -> np.ndarray:
    v_all, h, b, _ = logits.shape
    out = np.zeros(h)
    for hh in range(h):
        total = 0.0
        for v in range(n_large):
            for u in range(v_all):
                if u == v:
                    continue
                ce = 0.0
                for i in range(b):
                    ce += -float(np.dot(targets[v, hh, i], ref_log_softmax(logits[u, hh, i] / t)))
                total += ce / b
        out[hh] = total / (n_large * (v_all - 1))
    return out


def ref_uno(lab, unlab, over, labels, nlc, n_large, t, eps, iters):
    v_all, h, b, _ = unlab.shape
    res = {}
    for name, head in (("cluster", unlab), ("over", over)):
        k = head.shape[-1]
        logits = np.zeros((v_all, h, b, nlc + k))
        targets = np.zeros_like(logits)
        unl = [i for i in range(b) if labels[i] >= nlc]
        for v in range(v_all):
            for hh in range(h):
                logits[v, hh, :, :nlc] = lab[v]
                logits[v, hh, :, nlc:] = head[v, hh]
                if v >= n_large:
                    continue
                for i in range(b):
                    if labels[i] < nlc:
                        targets[v, hh, i, labels[i]] = 1.0
                if unl:
                    targets[v, hh, unl, nlc:] = ref_sk(head[v, hh, unl], eps, iters)
        res[name] = ref_swapped(logits, targets, n_large, t)
    return res


def rand(shape, seed, dtype=torch.float64, cosine=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    return torch.tanh(x) if cosine else x  # cosine-like logits in (-1, 1), as UNO's heads give


# ----------------------------------------------------------------------------- sinkhorn_knopp


@pytest.mark.parametrize("b,k", [(1, 1), (1, 5), (7, 3), (32, 10), (64, 30)])
@pytest.mark.parametrize("eps", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("iters", [1, 3, 10])
def test_sk_matches_reference_and_marginals(b, k, eps, iters):
    x = rand((b, k), seed=b * 100 + k)
    x0 = x.clone()
    q = sinkhorn_knopp(x, epsilon=eps, iters=iters)
    assert q.shape == (b, k) and not q.requires_grad
    assert torch.equal(x, x0)
    ref = ref_sk(x.numpy(), eps, iters)
    np.testing.assert_allclose(q.numpy(), ref, rtol=1e-5, atol=1e-8)
    # after the last column step every sample's row sums to 1
    np.testing.assert_allclose(q.sum(1).numpy(), np.ones(b), rtol=1e-10)
    # the total mass is B (prototype marginals: see test_sk_converges_to_equipartition)
    np.testing.assert_allclose(float(q.sum()), b, rtol=1e-10)


@pytest.mark.parametrize("b,k", [(1, 5), (7, 3), (32, 10)])
def test_sk_converges_to_equipartition(b, k):
    q = sinkhorn_knopp(rand((b, k), seed=b + k), epsilon=0.1, iters=500)
    np.testing.assert_allclose(q.sum(1).numpy(), np.ones(b), rtol=1e-10)
    np.testing.assert_allclose(q.sum(0).numpy(), np.full(k, b / k), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sk_float32_no_max_subtraction(dtype):
    x = rand((16, 8), seed=3, dtype=torch.float32).to(dtype)
    x0 = x.clone()
    q = sinkhorn_knopp(x)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    assert torch.equal(x, x0)
    np.testing.assert_allclose(q.numpy(), ref_sk(x.double().numpy(), 0.05, 3), rtol=2e-4, atol=1e-6)
    # no max subtraction: large logits overflow exactly like the official code
    assert not torch.isfinite(sinkhorn_knopp(torch.full((4, 3), 10.0))).all()


def test_sk_no_grad_and_input_untouched_with_grad():
    x = rand((10, 4), seed=1).requires_grad_()
    q = sinkhorn_knopp(x)
    assert not q.requires_grad and x.grad is None


@pytest.mark.parametrize(
    "bad,kw",
    [
        (torch.zeros(3), {}),
        (torch.zeros(2, 3, 4), {}),
        (torch.zeros(3, 4, dtype=torch.long), {}),
        (torch.zeros(0, 4), {}),
        (torch.zeros(3, 4), {"epsilon": 0.0}),
        (torch.zeros(3, 4), {"iters": -1}),
        (np.zeros((3, 4)), {}),
    ],
)
def test_sk_bad_input(bad, kw):
    with pytest.raises(NcdError):
        sinkhorn_knopp(bad, **kw)


# ----------------------------------------------------------------------------- swapped_prediction


@pytest.mark.parametrize("v_all,n_large", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("h,b,c", [(1, 1, 2), (3, 8, 5), (4, 16, 12)])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_swapped_matches_reference(v_all, n_large, h, b, c, t):
    seed = v_all * 1000 + h * 100 + b + c
    logits = rand((v_all, h, b, c), seed).requires_grad_()
    targets = torch.softmax(rand((v_all, h, b, c), seed + 1, cosine=False), -1).requires_grad_()
    l0, t0 = logits.detach().clone(), targets.detach().clone()
    out = swapped_prediction(logits, targets, num_large_crops=n_large, temperature=t)
    assert out.shape == (h,)
    np.testing.assert_allclose(
        out.detach().numpy(), ref_swapped(l0.numpy(), t0.numpy(), n_large, t), rtol=1e-5, atol=1e-8
    )
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert targets.grad is None
    assert torch.equal(logits.detach(), l0) and torch.equal(targets.detach(), t0)


def test_swapped_small_crop_targets_unused():
    logits = rand((4, 2, 6, 5), 7)
    targets = torch.softmax(rand((4, 2, 6, 5), 8), -1)
    other = targets.clone()
    other[2:] = torch.rand(2, 2, 6, 5, dtype=other.dtype)
    torch.testing.assert_close(swapped_prediction(logits, targets), swapped_prediction(logits, other))


@pytest.mark.parametrize(
    "logits,targets,kw",
    [
        (torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), {}),
        (torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 5), {}),
        (torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), {"num_large_crops": 1}),
        (torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), {"num_large_crops": 3}),
        (torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), {"num_large_crops": 0}),
        (torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), {"temperature": 0}),
        (torch.zeros(2, 1, 0, 4), torch.zeros(2, 1, 0, 4), {}),
    ],
)
def test_swapped_bad_input(logits, targets, kw):
    with pytest.raises(NcdError):
        swapped_prediction(logits, targets, **kw)


# ----------------------------------------------------------------------------- uno_loss


@pytest.mark.parametrize("v_all", [2, 4])
@pytest.mark.parametrize("h,b,nlc,nuc,f", [(1, 6, 3, 2, 3), (2, 16, 5, 5, 2), (4, 24, 4, 10, 3)])
@pytest.mark.parametrize("t,eps,iters", [(0.1, 0.05, 3), (0.5, 0.1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uno_loss_matches_reference(v_all, h, b, nlc, nuc, f, t, eps, iters, dtype):
    seed = v_all * 7 + h * 11 + b * 13 + nlc
    lab = rand((v_all, b, nlc), seed, dtype).requires_grad_()
    unlab = rand((v_all, h, b, nuc), seed + 1, dtype).requires_grad_()
    over = rand((v_all, h, b, nuc * f), seed + 2, dtype).requires_grad_()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, nlc + nuc, (b,), generator=g)
    labels[0], labels[1] = 0, nlc  # at least one labeled and one unlabeled row
    copies = [x.detach().clone() for x in (lab, unlab, over, labels)]
    out = uno_loss(lab, unlab, over, labels, nlc, num_large_crops=2, temperature=t, epsilon=eps, iters=iters)
    ref = ref_uno(*(x.numpy() for x in copies), nlc, 2, t, eps, iters)
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["loss_per_head"].numpy(), ref["cluster"], **tol)
    np.testing.assert_allclose(out["loss_cluster"].item(), ref["cluster"].mean(), **tol)
    np.testing.assert_allclose(out["loss_overcluster"].item(), ref["over"].mean(), **tol)
    np.testing.assert_allclose(out["loss"].item(), (ref["cluster"].mean() + ref["over"].mean()) / 2, **tol)
    assert out["loss"].dim() == 0 and not out["loss_per_head"].requires_grad
    out["loss"].backward()
    for x in (lab, unlab, over):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x, c in zip((lab, unlab, over, labels), copies):
        assert torch.equal(x.detach(), c)


@pytest.mark.parametrize("which", ["all_labeled", "all_unlabeled"])
def test_uno_loss_one_sided_batch(which):
    v_all, h, b, nlc, nuc = 4, 2, 8, 3, 4
    lab, unlab, over = rand((v_all, b, nlc), 1), rand((v_all, h, b, nuc), 2), rand((v_all, h, b, 2 * nuc), 3)
    labels = torch.arange(b) % nlc if which == "all_labeled" else nlc + torch.arange(b) % nuc
    out = uno_loss(lab, unlab, over, labels, nlc)
    ref = ref_uno(lab.numpy(), unlab.numpy(), over.numpy(), labels.numpy(), nlc, 2, 0.1, 0.05, 3)
    np.testing.assert_allclose(out["loss_per_head"].numpy(), ref["cluster"], rtol=1e-5)
    np.testing.assert_allclose(out["loss_overcluster"].item(), ref["over"].mean(), rtol=1e-5)


def test_uno_targets_are_not_differentiated():
    """Gradient = the one with targets frozen: perturbing SK inputs only via targets changes nothing."""
    v_all, h, b, nlc, nuc = 2, 1, 6, 2, 3
    lab, unlab, over = rand((v_all, b, nlc), 4), rand((v_all, h, b, nuc), 5), rand((v_all, h, b, 6), 6)
    labels = torch.tensor([0, 1, 2, 3, 4, 2])
    unlab.requires_grad_()
    uno_loss(lab, unlab, over, labels, nlc)["loss_cluster"].backward()
    # same loss with the targets built from a frozen copy, computed through swapped_prediction
    u2 = unlab.detach().clone().requires_grad_()
    logits = torch.cat([lab.unsqueeze(1).expand(-1, h, -1, -1), u2], -1)
    targets = torch.zeros_like(logits)
    for v in range(2):
        targets[v, 0, :2, :nlc] = torch.eye(nlc, dtype=targets.dtype)[labels[:2]]
        targets[v, 0, 2:, nlc:] = sinkhorn_knopp(unlab.detach()[v, 0, 2:])
    swapped_prediction(logits, targets).mean().backward()
    torch.testing.assert_close(unlab.grad, u2.grad)


def _good():
    return rand((2, 4, 3), 0), rand((2, 2, 4, 5), 1), rand((2, 2, 4, 10), 2), torch.tensor([0, 1, 3, 6])


@pytest.mark.parametrize(
    "field,value,kw",
    [
        (0, torch.zeros(2, 4), {}),  # logits_lab not 3-d
        (0, torch.zeros(2, 4, 2), {}),  # nlc mismatch
        (1, torch.zeros(2, 2, 5, 5), {}),  # batch mismatch
        (1, torch.zeros(3, 2, 4, 5), {}),  # view mismatch
        (2, torch.zeros(2, 3, 4, 10), {}),  # head mismatch
        (2, torch.zeros(2, 2, 4), {}),  # not 4-d
        (3, torch.tensor([0, 1, 3]), {}),  # labels length
        (3, torch.tensor([0.0, 1.0, 3.0, 6.0]), {}),  # float labels
        (3, torch.tensor([0, -1, 3, 6]), {}),  # negative label
        (None, None, {"num_large_crops": 3}),
        (None, None, {"temperature": -1.0}),
        (None, None, {"epsilon": 0.0}),
        (None, None, {"num_labeled_classes": 0}),
    ],
)
def test_uno_loss_bad_input(field, value, kw):
    args = list(_good())
    if field is not None:
        args[field] = value
    kwargs = {"num_labeled_classes": 3, **kw}
    with pytest.raises(NcdError):
        uno_loss(*args, **kwargs)
