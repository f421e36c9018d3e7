"""SCAN losses vs hand-written NumPy references of METHODS.md 1.3 (written independently here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncd.errors import NcdError
from ncd.losses import confidence_ce, scan_loss, simclr_loss

# ----------------------------------------------------------------------------- references


def np_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def ref_simclr(z: np.ndarray, t: float) -> float:
    """L = -(1/b) sum_i [s_{i,b+i} - log sum_{j != i} exp(s_ij)], anchors = first views."""
    b = z.shape[0]
    cols = np.concatenate([z[:, 0], z[:, 1]], axis=0)
    total = 0.0
    for i in range(b):
        s = [float(np.dot(z[i, 0], cols[j])) / t for j in range(2 * b)]
        m = max(s)
        denom = sum(math.exp(s[j] - m) for j in range(2 * b) if j != i)
        total += -((s[b + i] - m) - math.log(denom))
    return total / b


def ref_scan(x: np.ndarray, y: np.ndarray, w: float) -> tuple[float, float, float]:
    p, q = np_softmax(x), np_softmax(y)
    cons = 0.0
    for i in range(len(p)):
        sim = float(np.dot(p[i], q[i]))
        cons += -max(math.log(sim) if sim > 0 else -math.inf, -100.0)
    cons /= len(p)
    mean = np.maximum(p.mean(axis=0), 1e-8)
    ent = float(-(mean * np.log(mean)).sum())
    return cons - w * ent, cons, ent


def ref_confidence_ce(weak: np.ndarray, strong: np.ndarray, thr: float, balance: bool) -> float:
    pw = np_softmax(weak)
    conf = pw.max(axis=1)
    tgt = pw.argmax(axis=1)
    # torch compares a float32 tensor against the threshold rounded to float32
    sel = [i for i in range(len(pw)) if conf[i].astype(weak.dtype) > np.array(thr, dtype=weak.dtype)]
    assert sel, "reference needs a confident sample"
    n = len(sel)
    counts: dict[int, int] = {}
    for i in sel:
        counts[int(tgt[i])] = counts.get(int(tgt[i]), 0) + 1
    num = den = 0.0
    for i in sel:
        c = int(tgt[i])
        ce = -math.log(np_softmax(strong[i : i + 1].astype(np.float64))[0, c])
        wc = n / counts[c] if balance else 1.0
        num += wc * ce
        den += wc
    return num / den


def weak_logits(b: int, k: int, g: torch.Generator, scale: float, thr: float) -> torch.Tensor:
    """Weak-view logits none of whose confidences (max softmax) lies within 1e-6 of ``thr``: such a
    sample is selected or not depending on float32 rounding (torch vs NumPy), so it is redrawn."""
    for _ in range(100):
        weak = torch.randn(b, k, generator=g) * scale
        conf = np.max(np_softmax(weak.double().numpy()), axis=1)
        if np.all(np.abs(conf - thr) > 1e-6):
            return weak
    raise AssertionError(f"no [{b}, {k}] draw clear of the threshold {thr} in 100 tries")


def unit_features(b: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, 2, d, generator=g, dtype=dtype), dim=-1)


# ----------------------------------------------------------------------------- simclr


@pytest.mark.parametrize("b", [1, 2, 7, 32])
@pytest.mark.parametrize("d", [3, 16])
@pytest.mark.parametrize("t", [0.05, 0.1, 0.5, 1.0])
def test_simclr_matches_reference(b, d, t):
    z = unit_features(b, d, seed=b * 100 + d)
    got = simclr_loss(z, temperature=t)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref_simclr(z.numpy(), t), rel=1e-10, abs=1e-10)
    got32 = simclr_loss(z.float(), temperature=t)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(ref_simclr(z.numpy(), t), rel=1e-5, abs=1e-5)


def test_simclr_default_temperature_is_0_1():
    z = unit_features(5, 8, seed=3)
    assert simclr_loss(z).item() == pytest.approx(ref_simclr(z.numpy(), 0.1), rel=1e-10)


def test_simclr_hand_computed():
    # b=1: only negative-free denominator is the positive itself -> loss 0
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    assert simclr_loss(z, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    # b=2, T=1, identical views along e1 / e2: loss = log(2 + e) - 1
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    z = torch.tensor([[e1, e1], [e2, e2]], dtype=torch.float64)
    assert simclr_loss(z, 1.0).item() == pytest.approx(math.log(2 + math.e) - 1, rel=1e-12)


def test_simclr_is_one_directional():
    """Swapping the views changes the loss in general (only view 0 rows are anchors)."""
    z = unit_features(6, 4, seed=11)
    a = simclr_loss(z).item()
    b = simclr_loss(z.flip(1)).item()
    assert a != pytest.approx(b, rel=1e-6)
    assert b == pytest.approx(ref_simclr(z.flip(1).numpy(), 0.1), rel=1e-10)


def test_simclr_gradients_finite_and_match_gradcheck():
    z = unit_features(4, 5, seed=2).requires_grad_(True)
    loss = simclr_loss(z, 0.2)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    z2 = unit_features(3, 4, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: simclr_loss(f, 0.3), (z2,))


@pytest.mark.parametrize("bad", [torch.zeros(4, 3, 5), torch.zeros(4, 2), torch.zeros(0, 2, 3)])
def test_simclr_bad_input(bad):
    with pytest.raises(NcdError):
        simclr_loss(bad)


def test_simclr_bad_temperature():
    with pytest.raises(NcdError):
        simclr_loss(unit_features(2, 3, 0), temperature=0.0)


# ----------------------------------------------------------------------------- scan loss


@pytest.mark.parametrize("b", [1, 3, 64])
@pytest.mark.parametrize("k", [2, 10, 100])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_scan_loss_matches_reference(b, k, w, scale):
    g = torch.Generator().manual_seed(b * 7 + k)
    x = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
    y = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
    total, cons, ent = scan_loss(x, y, entropy_weight=w)
    rt, rc, re_ = ref_scan(x.numpy(), y.numpy(), w)
    assert cons.item() == pytest.approx(rc, rel=1e-10)
    assert ent.item() == pytest.approx(re_, rel=1e-10)
    assert total.item() == pytest.approx(rt, rel=1e-9, abs=1e-10)
    assert ent.item() > 0 or k == 1
    t32, c32, e32 = scan_loss(x.float(), y.float(), entropy_weight=w)
    assert t32.item() == pytest.approx(rt, rel=1e-4, abs=1e-4)


def test_scan_loss_default_weight_is_5():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    total, cons, ent = scan_loss(x, y)
    assert total.item() == pytest.approx(cons.item() - 5.0 * ent.item(), rel=1e-6)


def test_scan_loss_hand_computed():
    x = torch.zeros(2, 2)
    total, cons, ent = scan_loss(x, x.clone())
    # p = q = (1/2, 1/2): <p, q> = 1/2, consistency = log 2, entropy = log 2
    assert cons.item() == pytest.approx(math.log(2), rel=1e-6)
    assert ent.item() == pytest.approx(math.log(2), rel=1e-6)
    assert total.item() == pytest.approx(-4 * math.log(2), rel=1e-6)


def test_scan_loss_saturated_reaches_minus_100_clamp_and_stays_finite():
    big = 1e4
    x = torch.tensor([[big, -big, -big], [-big, big, -big]], requires_grad=True)
    y = torch.tensor([[-big, big, -big], [-big, big, -big]], requires_grad=True)
    total, cons, ent = scan_loss(x, y)
    # pair 0 disagrees (<p,q> = 0 -> -log clamped at 100), pair 1 agrees (-log 1 = 0)
    assert cons.item() == pytest.approx(50.0, rel=1e-6)
    # mean anchor prob = (1/2, 1/2, 0) -> clamp 1e-8 enters the entropy
    expected_ent = math.log(2) - 1e-8 * math.log(1e-8)
    assert ent.item() == pytest.approx(expected_ent, rel=1e-6)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    rt, rc, re_ = ref_scan(x.detach().double().numpy(), y.detach().double().numpy(), 5.0)
    assert cons.item() == pytest.approx(rc, rel=1e-6)


def test_scan_loss_all_identical_one_hot():
    x = torch.full((4, 3), -1e4)
    x[:, 0] = 1e4
    total, cons, ent = scan_loss(x, x.clone())
    assert cons.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(total)
    assert ent.item() == pytest.approx(-2 * 1e-8 * math.log(1e-8), rel=1e-3)


def test_scan_loss_gradient_flows_through_both_branches():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    total, cons, ent = scan_loss(x, y)
    total.backward()
    assert x.grad is not None and y.grad is not None
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda a, b: scan_loss(a, b, entropy_weight=3.0)[0], (x.detach().requires_grad_(), y.detach().requires_grad_()))


def test_scan_loss_entropy_uses_anchor_only():
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    _, _, e1 = scan_loss(x, y)
    _, _, e2 = scan_loss(x, y * 10)
    assert e1.item() == e2.item()


@pytest.mark.parametrize("a,b", [((4, 3), (4, 2)), ((4,), (4,)), ((0, 3), (0, 3))])
def test_scan_loss_bad_shapes(a, b):
    with pytest.raises(NcdError):
        scan_loss(torch.zeros(a), torch.zeros(b))


# ----------------------------------------------------------------------------- confidence CE


@pytest.mark.parametrize("b", [8, 50, 300])
@pytest.mark.parametrize("k", [2, 5, 20])
@pytest.mark.parametrize("thr", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("balance", [True, False])
def test_confidence_ce_matches_reference(b, k, thr, balance):
    g = torch.Generator().manual_seed(b + 31 * k)
    weak = weak_logits(b, k, g, 8.0, thr)
    strong = torch.randn(b, k, generator=g) * 2.0
    probs = torch.softmax(weak, 1).max(1).values
    if not bool((probs > thr).any()):
        weak[0, 0] = 1e3
    got = confidence_ce(weak, strong, threshold=thr, class_balance=balance)
    ref = ref_confidence_ce(weak.numpy(), strong.numpy(), thr, balance)
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    got64 = confidence_ce(weak.double(), strong.double(), threshold=thr, class_balance=balance)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(ref_confidence_ce(weak.double().numpy(), strong.double().numpy(), thr, balance), rel=1e-10)


def test_confidence_ce_defaults_threshold_099_balanced():
    g = torch.Generator().manual_seed(1)
    weak = weak_logits(64, 4, g, 10.0, 0.99)
    strong = torch.randn(64, 4, generator=g)
    assert confidence_ce(weak, strong).item() == pytest.approx(ref_confidence_ce(weak.numpy(), strong.numpy(), 0.99, True), rel=1e-5)


def test_confidence_ce_hand_computed():
    # weak picks classes 0, 0, 1 confidently and one unconfident row; strong rows [a, 0]
    weak = torch.tensor([[20.0, 0.0], [20.0, 0.0], [0.0, 20.0], [0.0, 0.0]])
    strong = torch.tensor([[0.0, 0.0], [0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]])
    # CE = log 2, log 2, log 4; balanced weights 3/2, 3/2, 3 -> (1.5 log2 + 1.5 log2 + 3 log 4)/6
    assert confidence_ce(weak, strong).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert confidence_ce(weak, strong, class_balance=False).item() == pytest.approx(4 / 3 * math.log(2), rel=1e-6)


def test_confidence_ce_threshold_is_strict():
    # softmax([log 3, 0]) = (0.75, 0.25): threshold 0.75 selects nothing, 0.7499 selects it
    weak = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    strong = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError):
        confidence_ce(weak, strong, threshold=0.75)
    assert confidence_ce(weak, strong, threshold=0.7499).item() == pytest.approx(math.log(2))


def test_confidence_ce_all_one_class_equals_plain_mean():
    g = torch.Generator().manual_seed(2)
    weak = torch.zeros(10, 3)
    weak[:, 1] = 30.0
    strong = torch.randn(10, 3, generator=g)
    a = confidence_ce(weak, strong, class_balance=True)
    b = confidence_ce(weak, strong, class_balance=False)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert a.item() == pytest.approx(torch.nn.functional.cross_entropy(strong, torch.ones(10, dtype=torch.long)).item(), rel=1e-6)


def test_confidence_ce_no_confident_sample_raises_by_default():
    weak = torch.zeros(6, 4)
    strong = torch.randn(6, 4)
    with pytest.raises(ValueError, match="Mask in MaskedCrossEntropyLoss is all zeros."):
        confidence_ce(weak, strong)
    with pytest.raises(NcdError):
        confidence_ce(weak, strong, on_empty="raise")


def test_confidence_ce_no_confident_sample_zero_keeps_graph():
    weak = torch.zeros(6, 4)
    strong = torch.randn(6, 4, requires_grad=True)
    loss = confidence_ce(weak, strong, on_empty="zero")
    assert loss.item() == 0.0 and loss.dim() == 0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(strong.grad, torch.zeros(6, 4))
    # inf logits in the strong view must not turn the skipped batch into NaN
    s2 = torch.full((2, 4), float("inf"), requires_grad=True)
    z = confidence_ce(torch.zeros(2, 4), s2, on_empty="zero")
    assert z.item() == 0.0


def test_confidence_ce_bad_on_empty():
    with pytest.raises(NcdError):
        confidence_ce(torch.zeros(2, 2), torch.zeros(2, 2), on_empty="skip")


def test_confidence_ce_on_empty_is_keyword_only():
    with pytest.raises(TypeError):
        confidence_ce(torch.zeros(2, 2), torch.zeros(2, 2), 0.99, True, "zero")  # type: ignore[misc]


def test_confidence_ce_gradient_only_through_strong():
    g = torch.Generator().manual_seed(3)
    weak = (torch.randn(16, 3, generator=g, dtype=torch.float64) * 10).requires_grad_(True)
    strong = torch.randn(16, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = confidence_ce(weak, strong, threshold=0.9)
    loss.backward()
    assert weak.grad is None
    assert torch.isfinite(strong.grad).all() and strong.grad.abs().sum() > 0
    w = weak.detach()
    assert torch.autograd.gradcheck(lambda s: confidence_ce(w, s, threshold=0.9), (strong.detach().requires_grad_(),))


def test_confidence_ce_saturated_logits_finite():
    weak = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [1e4, -1e4]])
    strong = torch.tensor([[-1e4, 1e4], [-1e4, 1e4], [1e4, -1e4]], requires_grad=True)
    loss = confidence_ce(weak, strong)
    # CE = 2e4, 0, 0; weights 3/2, 3, 3/2 -> (1.5 * 2e4) / 6
    assert loss.item() == pytest.approx(5e3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(strong.grad).all()


def test_confidence_ce_shape_mismatch():
    with pytest.raises(NcdError):
        confidence_ce(torch.zeros(3, 2), torch.zeros(3, 4))
