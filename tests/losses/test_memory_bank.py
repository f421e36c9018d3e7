"""memory_bank_update against a NumPy loop of the official update (last write wins)."""

import numpy as np
import pytest
import torch

from ncd.errors import NcdError
from ncd.losses.memory import memory_bank_update


def _reference(mem, x, idx, m):
    out = mem.copy()
    for j, i in enumerate(idx):  # sequential copy: a later duplicate overwrites an earlier one
        v = m * mem[i] + (1 - m) * x[j]
        out[i] = v / np.linalg.norm(v)
    return out


@pytest.mark.parametrize("n,d,b", [(10, 4, 3), (50, 16, 20), (7, 3, 14)])
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_matches_numpy_reference_with_duplicates(n, d, b, momentum):
    g = np.random.default_rng(n * d + b)
    mem = g.uniform(-1, 1, (n, d))
    x = g.normal(size=(b, d))
    idx = g.integers(0, n, b)
    got = memory_bank_update(torch.tensor(mem), torch.tensor(x), torch.tensor(idx), momentum)
    np.testing.assert_allclose(got.numpy(), _reference(mem, x, idx, momentum), rtol=1e-12, atol=1e-12)


def test_two_views_view2_wins_and_input_untouched():
    mem = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    before = mem.clone()
    v1, v2 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    idx = torch.tensor([1, 4])
    out = memory_bank_update(mem, torch.cat([v1, v2]), torch.cat([idx, idx]))
    assert torch.equal(mem, before)
    expect = torch.nn.functional.normalize(0.5 * mem[idx] + 0.5 * v2, dim=1)
    torch.testing.assert_close(out[idx], expect)
    untouched = torch.tensor([0, 2, 3, 5])
    assert torch.equal(out[untouched], mem[untouched])


def test_bad_index_is_named():
    with pytest.raises(NcdError, match="index must lie in 0..3"):
        memory_bank_update(torch.zeros(4, 2), torch.ones(1, 2), torch.tensor([4]))
