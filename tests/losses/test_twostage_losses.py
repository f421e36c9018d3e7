"""The two-stage classifier's losses against hand-written NumPy versions of their formulas
(METHODS.md 6.3, 6.4): anchor neighbourhoods, Super-AND, IIC, L_cp and the stage-2 objective."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ncd.errors import NcdError
from ncd.losses import anchor_neighbourhoods, cp_loss, iic_loss, super_and_loss, twostage_loss
from ncd.models import normalized_fc

EPS = sys.float_info.epsilon


# ----------------------------------------------------------------------------- NumPy references
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_anchors(m: np.ndarray, rnd: int, rate: float, k: int, t: float):
    p = softmax(m @ m.T / t)
    ent = -(p * np.log(p)).sum(1)
    num = min(len(m), int(len(m) * rate * rnd))
    anchors = np.argsort(ent, kind="stable")[:num]
    nbrs = np.zeros((num, k), dtype=np.int64)
    for a_i, a in enumerate(anchors):
        sims = m[a] @ m.T
        sims[a] = -np.inf
        nbrs[a_i] = np.argsort(-sims, kind="stable")[:k]
    return anchors, nbrs, ent


def clear_order(values: np.ndarray, count: int, rtol: float = 1e-9) -> bool:
    """The ``count`` smallest ``values`` are ordered (and cut from the rest) by gaps above ``rtol``:
    no near-tie whose order another summation order could flip."""
    head = np.sort(values)[: count + 1]
    return bool(np.all(np.diff(head) > rtol * np.maximum(1.0, np.abs(head[1:]))))


def untied_memory(rng: np.random.Generator, n: int, d: int, rnd: int, rate: float, k: int, t: float) -> np.ndarray:
    """Unit rows whose reference anchors (entropy ranking) and neighbourhoods (similarity ranking) have
    no near-tie; a draw with one is redrawn, so the exact index comparisons do not hang on rounding."""
    for _ in range(100):
        m = unit(rng.normal(size=(n, d)))
        anchors, _, ent = ref_anchors(m, rnd, rate, k, t)
        sims = m[anchors] @ m.T
        sims[np.arange(len(anchors)), anchors] = np.inf  # self: never a neighbour
        if clear_order(ent, len(anchors)) and all(clear_order(-row, k + 1) for row in sims):
            return m
    raise AssertionError(f"no tie-free [{n}, {d}] memory in 100 tries")


def ref_batch_loss(x: np.ndarray, t: float, neg_m: float, const: np.ndarray | None = None) -> float:
    """Super-AND's batch criterion; ``const`` is the (detached) second operand, default ``x``."""
    c = x if const is None else const
    n = len(x)
    pi = np.concatenate([np.arange(n // 2, n), np.arange(n // 2)])
    e = np.exp(x @ c.T / t)
    np.fill_diagonal(e, 0.0)
    total = 0.0
    for i in range(n):
        pos = e[i, pi[i]]
        d = (e[i].sum() - pos) * neg_m + pos
        total += np.log(pos / d)
        total += neg_m * sum(np.log(1 - e[i, j] / d) for j in range(n) if j not in (i, pi[i]))
    return -total / n


def ref_super_and(f, idx, mem, anchors, nbrs, ue_w, tn, tb, neg_m, aug_const=None):
    logits = f @ mem.T / tn
    y = np.concatenate([idx, idx])
    p = softmax(logits)
    where = {int(a): i for i, a in enumerate(anchors)}
    l_and = 0.0
    for r in range(len(f)):
        prob = p[r, y[r]]
        if int(y[r]) in where:
            prob += p[r, nbrs[where[int(y[r])]]].sum()
        l_and -= np.log(prob)
    l_and /= len(f)
    z = unit(logits)
    zc = None if aug_const is None else unit(aug_const @ mem.T / tn)
    l_aug = ref_batch_loss(z, tb, neg_m, zc)
    masked = logits.copy()
    masked[np.arange(len(f)), y] = -10.0
    q = softmax(masked)
    l_ue = -(q * np.log(q)).sum() / len(f)
    return {"loss": l_and + l_aug + ue_w * l_ue, "loss_and": l_and, "loss_aug": l_aug, "loss_ue": l_ue}


def ref_iic(p1: np.ndarray, p2: np.ndarray) -> float:
    joint = p1.T @ p2
    joint = (joint + joint.T) / 2
    joint = joint / joint.sum()
    pi = joint.sum(1)[:, None] * np.ones_like(joint)
    pj = joint.sum(0)[None, :] * np.ones_like(joint)
    joint, pi, pj = (np.where(a < EPS, EPS, a) for a in (joint, pi, pj))
    return float(-(joint * (np.log(joint) - np.log(pj) - np.log(pi))).sum())


def ref_fc(f: np.ndarray, w: np.ndarray, t: float, normalize: str) -> np.ndarray:
    axis = 1 if normalize == "row" else 0
    return softmax(f @ (w / np.sqrt((w**2).sum(axis, keepdims=True))) / t)


def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def _num_grad(fn, x: np.ndarray, h: float = 1e-4) -> np.ndarray:
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (fn(xp) - fn(xm)) / (2 * h)
    return g


# ------------------------------------------------------------------------ anchor neighbourhoods
@pytest.mark.parametrize("n,d,rnd,rate,k,t", [(20, 8, 1, 0.25, 1, 0.1), (33, 5, 2, 0.25, 3, 0.1),
                                              (16, 4, 4, 0.25, 2, 0.5), (12, 6, 3, 0.4, 1, 0.05)])
def test_anchor_neighbourhoods_match_reference(n, d, rnd, rate, k, t):
    rng = np.random.default_rng(n + rnd)
    m = untied_memory(rng, n, d, rnd, rate, k, t)
    anchors, nbrs, ent = anchor_neighbourhoods(_t(m), rnd, rate, k, t)
    ra, rn, re = ref_anchors(m, rnd, rate, k, t)
    assert anchors.dtype == nbrs.dtype == torch.int64
    np.testing.assert_allclose(ent.numpy(), re, rtol=1e-10, atol=1e-15)
    np.testing.assert_array_equal(anchors.numpy(), ra)
    np.testing.assert_array_equal(nbrs.numpy(), rn)
    assert len(anchors) == min(n, int(n * rate * rnd))
    assert not (nbrs == anchors.view(-1, 1)).any()  # never the anchor itself


def test_round_zero_has_no_anchors_but_entropies():
    m = unit(np.random.default_rng(0).normal(size=(10, 4)))
    anchors, nbrs, ent = anchor_neighbourhoods(_t(m), 0)
    assert anchors.shape == (0,) and nbrs.shape == (0, 1)
    np.testing.assert_allclose(ent.numpy(), ref_anchors(m, 0, 0.25, 1, 0.1)[2], rtol=1e-10)


def test_entropy_ties_go_to_the_lower_index():
    # rows 0/3, 1/4 and 2/5 are copies, so their entropies are equal to the last bit
    base = unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0]]))
    m = base[[0, 1, 2, 0, 1, 2]]
    anchors, nbrs, ent = anchor_neighbourhoods(_t(m), 1, select_rate=0.5, ans_size=1)  # 3 anchors
    assert ent[0] == ent[3] and ent[1] == ent[4] and ent[2] == ent[5]
    order = np.argsort(ent.numpy(), kind="stable")
    np.testing.assert_array_equal(anchors.numpy(), order[:3])
    # a tied pair cut by the count keeps its lower index
    first_pair = sorted({int(order[0]), int(order[1])})
    assert ent[order[0]] == ent[order[1]] and list(anchors[:2].numpy()) == first_pair
    # each copy's nearest other row is its twin
    twin = {0: 3, 3: 0, 1: 4, 4: 1, 2: 5, 5: 2}
    assert [twin[int(a)] for a in anchors] == nbrs[:, 0].tolist()


def test_neighbour_ties_go_to_the_lower_index():
    m = unit(np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    # rows 1 and 2 are equally similar to row 0; row 0 must be an anchor: rate 1, round 1 → all rows
    anchors, nbrs, _ = anchor_neighbourhoods(_t(m), 1, select_rate=1.0, ans_size=2)
    row0 = nbrs[anchors.tolist().index(0)].tolist()
    assert row0 == [1, 2]


def test_anchor_count_is_capped_and_bad_input_is_named():
    m = _t(unit(np.random.default_rng(1).normal(size=(8, 3))))
    assert len(anchor_neighbourhoods(m, 5)[0]) == 8
    with pytest.raises(NcdError, match="round must be an integer >= 0"):
        anchor_neighbourhoods(m, -1)
    with pytest.raises(NcdError, match="ans_size must lie in 1..7"):
        anchor_neighbourhoods(m, 1, ans_size=8)
    with pytest.raises(NcdError, match="select_rate"):
        anchor_neighbourhoods(m, 1, select_rate=1.5)
    with pytest.raises(NcdError, match="memory must have 2 dimensions"):
        anchor_neighbourhoods(m[0], 1)


# -------------------------------------------------------------------------------- batch losses
@pytest.mark.parametrize("b,d,t,neg_m", [(2, 3, 0.1, 1.0), (5, 8, 0.1, 1.0), (4, 6, 0.5, 1.5), (3, 4, 0.2, 2.0)])
def test_cp_loss_matches_reference(b, d, t, neg_m):
    x = unit(np.random.default_rng(b * d).normal(size=(2 * b, d)))
    got = cp_loss(_t(x), t, neg_m)
    assert got.item() == pytest.approx(ref_batch_loss(x, t, neg_m), rel=1e-9)
    got32 = cp_loss(torch.tensor(x, dtype=torch.float32), t, neg_m)
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(ref_batch_loss(x, t, neg_m), rel=1e-4)


@pytest.mark.parametrize("neg_m", [1.0, 2.0])
def test_cp_loss_gradient_treats_the_second_operand_as_constant(neg_m):
    x = unit(np.random.default_rng(7).normal(size=(6, 3)))
    xt = _t(x, grad=True)
    cp_loss(xt, 0.5, neg_m).backward()
    want = _num_grad(lambda v: ref_batch_loss(v, 0.5, neg_m, const=x), x)
    np.testing.assert_allclose(xt.grad.numpy(), want, rtol=1e-5, atol=1e-6)
    # and that differs from the gradient through both operands
    full = _num_grad(lambda v: ref_batch_loss(v, 0.5, neg_m), x)
    assert not np.allclose(full, want, atol=1e-4)


def test_cp_loss_bad_input():
    with pytest.raises(NcdError, match="even number"):
        cp_loss(torch.randn(5, 3))
    with pytest.raises(NcdError, match="neg_m must be > 0"):
        cp_loss(torch.randn(4, 3), neg_m=0.0)


# ------------------------------------------------------------------------------- Super-AND loss
@pytest.mark.parametrize("b,n,d,rnd,ue_w,tn,tb,neg_m", [
    (4, 20, 8, 0, 0.0, 0.1, 0.1, 1.0),   # round 0: every sample is its own class
    (4, 20, 8, 2, 0.2, 0.1, 0.1, 1.0),
    (6, 30, 5, 4, 0.4, 0.2, 0.5, 1.0),   # every sample an anchor
    (3, 15, 6, 1, 0.2, 0.1, 0.1, 2.0),   # neg_m != 1
])
def test_super_and_loss_matches_reference(b, n, d, rnd, ue_w, tn, tb, neg_m):
    rng = np.random.default_rng(n * d + rnd)
    mem = unit(rng.normal(size=(n, d)))
    f = unit(rng.normal(size=(2 * b, d)))
    idx = rng.choice(n, size=b, replace=False)
    anchors, nbrs, _ = anchor_neighbourhoods(_t(mem), rnd, ans_size=2)
    got = super_and_loss(_t(f), torch.tensor(idx), _t(mem), anchors, nbrs, ue_w, tn, tb, neg_m)
    want = ref_super_and(f, idx, mem, anchors.numpy(), nbrs.numpy(), ue_w, tn, tb, neg_m)
    for k in ("loss", "loss_and", "loss_aug", "loss_ue"):
        assert got[k].item() == pytest.approx(want[k], rel=1e-9), k


def test_super_and_anchor_term_adds_the_neighbours_probability():
    rng = np.random.default_rng(3)
    mem = unit(rng.normal(size=(10, 4)))
    f = unit(rng.normal(size=(4, 4)))
    idx = np.array([2, 7])
    none = super_and_loss(_t(f), torch.tensor(idx), _t(mem), torch.zeros(0, dtype=torch.long),
                          torch.zeros(0, 1, dtype=torch.long))
    some = super_and_loss(_t(f), torch.tensor(idx), _t(mem), torch.tensor([7]), torch.tensor([[4]]))
    p = softmax(f @ mem.T / 0.1)
    delta = (np.log(p[1, 7]) - np.log(p[1, 7] + p[1, 4]) + np.log(p[3, 7]) - np.log(p[3, 7] + p[3, 4])) / 4
    assert (some["loss_and"] - none["loss_and"]).item() == pytest.approx(delta, rel=1e-9)
    assert some["loss_aug"].item() == none["loss_aug"].item() and some["loss_ue"].item() == none["loss_ue"].item()


def test_super_and_gradient_memory_constant_aug_second_operand_detached():
    rng = np.random.default_rng(11)
    mem = unit(rng.normal(size=(8, 3)))
    f = unit(rng.normal(size=(4, 3)))
    idx = np.array([1, 5])
    anchors, nbrs = np.array([5, 0]), np.array([[2], [6]])
    ft, mt = _t(f, grad=True), _t(mem, grad=True)
    super_and_loss(ft, torch.tensor(idx), mt, torch.tensor(anchors), torch.tensor(nbrs), 0.4)["loss"].backward()
    assert mt.grad is None  # the memory is a constant
    want = _num_grad(lambda v: ref_super_and(v, idx, mem, anchors, nbrs, 0.4, 0.1, 0.1, 1.0, aug_const=f)["loss"], f)
    np.testing.assert_allclose(ft.grad.numpy(), want, rtol=1e-5, atol=1e-6)


def test_super_and_ue_masks_the_own_logit():
    rng = np.random.default_rng(5)
    mem = unit(rng.normal(size=(6, 3)))
    f = mem[[0, 1, 0, 1]]  # each row is its own memory row: the unmasked own logit would dominate
    out = super_and_loss(_t(f), torch.tensor([0, 1]), _t(mem), torch.zeros(0, dtype=torch.long),
                         torch.zeros(0, 1, dtype=torch.long))
    logits = f @ mem.T / 0.1
    logits[[0, 1, 2, 3], [0, 1, 0, 1]] = -10.0
    q = softmax(logits)
    assert out["loss_ue"].item() == pytest.approx(-(q * np.log(q)).sum() / 4, rel=1e-9)


def test_super_and_bad_input_is_named():
    mem, f = torch.randn(10, 4), torch.randn(4, 4)
    empty, empty_n = torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
    with pytest.raises(NcdError, match="index must be an integer vector of length 2"):
        super_and_loss(f, torch.tensor([0, 1, 2]), mem, empty, empty_n)
    with pytest.raises(NcdError, match=r"index must lie in 0..9"):
        super_and_loss(f, torch.tensor([0, 10]), mem, empty, empty_n)
    with pytest.raises(NcdError, match="memory has 3 columns"):
        super_and_loss(f, torch.tensor([0, 1]), torch.randn(10, 3), empty, empty_n)
    with pytest.raises(NcdError, match=r"anchors must be \[A\] and neighbours \[A, k\]"):
        super_and_loss(f, torch.tensor([0, 1]), mem, torch.tensor([1, 2]), torch.tensor([[3]]))


# ------------------------------------------------------------------------------------------ IIC
@pytest.mark.parametrize("b,c", [(8, 3), (32, 10), (5, 7)])
def test_iic_loss_matches_reference(b, c):
    rng = np.random.default_rng(b + c)
    p1, p2 = softmax(rng.normal(size=(b, c)) * 2), softmax(rng.normal(size=(b, c)) * 2)
    assert iic_loss(_t(p1), _t(p2)).item() == pytest.approx(ref_iic(p1, p2), rel=1e-9, abs=1e-15)
    got32 = iic_loss(torch.tensor(p1, dtype=torch.float32), torch.tensor(p2, dtype=torch.float32))
    assert got32.item() == pytest.approx(ref_iic(p1, p2), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("c", [2, 5, 10])
def test_iic_one_hot_balanced_agreement_is_minus_log_c(c):
    p = np.eye(c)[np.arange(4 * c) % c]
    got = iic_loss(_t(p), _t(p)).item()
    assert got == pytest.approx(-np.log(c), rel=1e-9)
    assert got == pytest.approx(ref_iic(p, p), rel=1e-9)


@pytest.mark.parametrize("c", [2, 10])
def test_iic_uniform_and_collapsed_inputs_carry_no_information(c):
    u = np.full((6, c), 1.0 / c)
    assert iic_loss(_t(u), _t(u)).item() == pytest.approx(0.0, abs=1e-12)
    one = np.eye(c)[np.zeros(6, dtype=int)]  # every sample in class 0: the clamp keeps it finite
    got = iic_loss(_t(one), _t(one)).item()
    assert got == pytest.approx(ref_iic(one, one), rel=1e-9, abs=1e-20) and abs(got) < 1e-12


def test_iic_gradient_and_bad_input():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    t1 = _t(z1, grad=True)
    iic_loss(torch.softmax(t1, 1), torch.softmax(_t(z2), 1)).backward()
    want = _num_grad(lambda v: ref_iic(softmax(v), softmax(z2)), z1)
    np.testing.assert_allclose(t1.grad.numpy(), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(NcdError, match="same shape"):
        iic_loss(torch.rand(4, 3), torch.rand(4, 2))


# -------------------------------------------------------------------------------- stage 2 loss
@pytest.mark.parametrize("normalize", ["row", "column"])
@pytest.mark.parametrize("n,d,c,t", [(6, 8, 3, 0.1), (10, 16, 10, 0.5)])
def test_normalized_fc_matches_reference(normalize, n, d, c, t):
    rng = np.random.default_rng(n * c)
    f, w = unit(rng.normal(size=(n, d))), rng.normal(size=(d, c))
    got = normalized_fc(_t(f), _t(w), t, normalize)
    np.testing.assert_allclose(got.numpy(), ref_fc(f, w, t, normalize), rtol=1e-10)
    assert ref_fc(f, w, t, "row").tolist() != ref_fc(f, w, t, "column").tolist()
    with pytest.raises(NcdError, match="normalize must be 'row'"):
        normalized_fc(_t(f), _t(w), t, "both")
    with pytest.raises(NcdError, match=r"weight must be \[d=%d, C\]" % d):
        normalized_fc(_t(f), _t(w.T), t)


@pytest.mark.parametrize("b,d,c,h,tc,t,neg_m", [(4, 8, 3, 5, 0.1, 0.1, 1.0), (6, 5, 4, 2, 0.2, 0.5, 0.5)])
def test_twostage_loss_matches_reference(b, d, c, h, tc, t, neg_m):
    rng = np.random.default_rng(b * h)
    f = unit(rng.normal(size=(2 * b, d)))
    w = rng.normal(size=(h, d, c))
    got = twostage_loss(_t(f), _t(w), tc, t, neg_m)
    mi = [ref_iic(ref_fc(f, w[k], tc, "row")[:b], ref_fc(f, w[k], tc, "row")[b:]) for k in range(h)]
    cp = ref_batch_loss(f, t, neg_m)
    np.testing.assert_allclose(got["mi_per_head"].numpy(), mi, rtol=1e-9)
    assert got["loss_mi"].item() == pytest.approx(np.mean(mi), rel=1e-9)
    assert got["loss_cp"].item() == pytest.approx(cp, rel=1e-9)
    assert got["loss"].item() == pytest.approx(cp + np.mean(mi), rel=1e-9)
    col = twostage_loss(_t(f), _t(w), tc, t, neg_m, normalize="column")["mi_per_head"].numpy()
    np.testing.assert_allclose(col, [ref_iic(ref_fc(f, w[k], tc, "column")[:b], ref_fc(f, w[k], tc, "column")[b:])
                                     for k in range(h)], rtol=1e-9)


def test_twostage_loss_trains_the_features_only():
    rng = np.random.default_rng(4)
    f = _t(unit(rng.normal(size=(8, 6))), grad=True)
    w = _t(rng.normal(size=(3, 6, 4)))
    twostage_loss(f, w)["loss"].backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and w.grad is None
    with pytest.raises(NcdError, match=r"head_weights must be \[H, d=6, C\]"):
        twostage_loss(f, torch.randn(3, 5, 4))
