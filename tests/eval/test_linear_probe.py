"""The Lightning linear probe on frozen features."""

from __future__ import annotations

import pytest
import torch

from ncd.errors import NcdError
from ncd.eval.linear_probe import linear_probe

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def blobs(n: int, d: int, c: int, seed: int, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    return centers[y] + spread * torch.randn(n, d, generator=g), y


@pytest.mark.parametrize("normalize", ["none", "l2", "standardize"])
def test_probe_learns_separable_classes(normalize):
    xall, yall = blobs(400, 8, 4, seed=1)
    xtr, ytr, xte, yte = xall[:300], yall[:300], xall[300:], yall[300:]
    res = linear_probe(xtr, ytr, xte, yte, 4, epochs=30, batch_size=64, lr=0.1, normalize=normalize)
    assert set(res) == {"top1", "top5", "predictions", "final_loss"}
    assert res["predictions"].shape == (100,) and res["predictions"].dtype == torch.int64
    assert res["top1"] >= 0.95 and res["top5"] == 1.0
    assert res["top1"] == float((res["predictions"] == yte).double().mean())
    assert res["final_loss"] < 0.5


def test_probe_is_seeded_and_leaves_the_global_rng_alone():
    x, y = blobs(200, 6, 3, seed=2, spread=3.0)  # overlapping: the result depends on the seed path
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = linear_probe(x[:150], y[:150], x[150:], y[150:], 3, epochs=3, batch_size=32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = linear_probe(x[:150], y[:150], x[150:], y[150:], 3, epochs=3, batch_size=32, seed=5)
    assert torch.equal(a["predictions"], b["predictions"]) and a["final_loss"] == b["final_loss"]


def test_probe_lr_milestones_change_the_result():
    x, y = blobs(200, 6, 3, seed=3, spread=2.0)
    a = linear_probe(x[:150], y[:150], x[150:], y[150:], 3, epochs=4, batch_size=50, lr=0.5, milestones=[1], gamma=0.0001)
    b = linear_probe(x[:150], y[:150], x[150:], y[150:], 3, epochs=4, batch_size=50, lr=0.5)
    assert a["final_loss"] != b["final_loss"]


def test_probe_accepts_numpy():
    x, y = blobs(120, 4, 2, seed=4)
    res = linear_probe(x.numpy(), y.numpy(), x.numpy(), y.numpy(), 2, epochs=5, batch_size=40)
    assert res["top1"] > 0.9


@pytest.mark.parametrize("kwargs,match", [
    ({"normalize": "zca"}, "normalize"), ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"),
])
def test_probe_bad_options(kwargs, match):
    x, y = blobs(20, 4, 2, seed=5)
    with pytest.raises(NcdError, match=match):
        linear_probe(x, y, x, y, 2, **kwargs)


def test_probe_bad_inputs():
    x, y = blobs(20, 4, 2, seed=6)
    with pytest.raises(NcdError, match="differ in dimension"):
        linear_probe(x, y, x[:, :3], y, 2)
    with pytest.raises(NcdError, match="must lie in"):
        linear_probe(x, y + 5, x, y, 2)
    with pytest.raises(NcdError, match="integer class ids"):
        linear_probe(x, y.float(), x, y, 2)
    with pytest.raises(NcdError, match=r"\[N, d\]"):
        linear_probe(x[:, 0], y, x, y, 2)
