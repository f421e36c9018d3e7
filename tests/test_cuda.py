"""The CUDA path: every loss on the GPU equals its CPU value (float32, 1e-5), and one training step
plus one resume of every method on the GPU (``benchmarks/gpu_check.py --device cuda --tiny``, run by
tests/test_gpu_check.py). Skipped, with the reason, where no CUDA device is visible.

The case table is also run on the CPU (``test_cases_run_on_the_cpu``), so that the inputs it builds
stay valid for every loss even on machines that never run the CUDA comparison.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from ncd import losses as L

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _unit(*shape: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _cases() -> dict[str, tuple[Callable[..., Any], Callable[[torch.Generator], tuple]]]:
    """name → (function, builder of its CPU inputs from a generator)."""
    b, k, d, n = 32, 10, 16, 200
    return {
        "simclr_loss": (L.simclr_loss, lambda g: (_unit(b, 2, d, g=g), 0.5)),
        "scan_loss": (L.scan_loss, lambda g: (torch.randn(b, k, generator=g), torch.randn(b, k, generator=g), 5.0)),
        "confidence_ce": (L.confidence_ce, lambda g: (4 * torch.randn(b, k, generator=g), torch.randn(b, k, generator=g),
                                                      0.5, True)),
        "sinkhorn_knopp": (L.sinkhorn_knopp, lambda g: (_unit(b, k, g=g), 0.05, 3)),
        "swapped_prediction": (L.swapped_prediction, lambda g: (torch.randn(4, 2, b, k, generator=g),
                                                                torch.softmax(torch.randn(4, 2, b, k, generator=g), -1), 2)),
        "uno_loss": (L.uno_loss, lambda g: (torch.randn(2, b, 5, generator=g), torch.randn(2, 2, b, 5, generator=g),
                                            torch.randn(2, 2, b, 15, generator=g),
                                            torch.randint(0, 10, (b,), generator=g), 5)),
        "memory_bank_update": (L.memory_bank_update, lambda g: (_unit(n, d, g=g), _unit(b, d, g=g),
                                                                torch.randperm(n, generator=g)[:b], 0.5)),
        "batch_kmeans": (L.batch_kmeans, lambda g: (_unit(b, d, g=g), 4, 5)),
        "cld_loss": (L.cld_loss, lambda g: (_unit(b, d, g=g), _unit(b, d, g=g), 4, 0.2, 5)),
        "npid_loss": (L.npid_loss, lambda g: (_unit(b, d, g=g), torch.randperm(n, generator=g)[:b], _unit(n, d, g=g), 0.1)),
        "moco_logits": (L.moco_logits, lambda g: (_unit(b, d, g=g), _unit(b, d, g=g), _unit(n, d, g=g), 0.07)),
        "enqueue": (L.enqueue, lambda g: (_unit(n, d, g=g), _unit(b, d, g=g), 190)),
        "anchor_neighbourhoods": (L.anchor_neighbourhoods, lambda g: (_unit(n, d, g=g), 1, 0.25, 1, 0.1)),
        "super_and_loss": (L.super_and_loss, lambda g: (_unit(2 * b, d, g=g), torch.randperm(n, generator=g)[:b],
                                                        _unit(n, d, g=g), torch.arange(0, n, 4),
                                                        torch.randint(0, n, (n // 4, 1), generator=g), 0.2)),
        "iic_loss": (L.iic_loss, lambda g: (torch.softmax(torch.randn(b, k, generator=g), 1),
                                            torch.softmax(torch.randn(b, k, generator=g), 1))),
        "cp_loss": (L.cp_loss, lambda g: (_unit(2 * b, d, g=g), 0.1, 1.0)),
        "twostage_loss": (L.twostage_loss, lambda g: (_unit(2 * b, d, g=g), torch.randn(2, d, k, generator=g))),
        "sela_sinkhorn": (L.sela_sinkhorn, lambda g: (torch.softmax(torch.randn(n, k, generator=g).double(), 1), 25.0)),
        "sela_cost": (L.sela_cost, lambda g: (torch.softmax(torch.randn(n, k, generator=g).double(), 1),
                                              torch.randint(0, k, (n,), generator=g))),
    }


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _leaves(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        return {k2: v2 for k, v in x.items() for k2, v2 in _leaves(v, f"{prefix}.{k}").items()}
    if isinstance(x, (tuple, list)):
        return {k2: v2 for i, v in enumerate(x) for k2, v2 in _leaves(v, f"{prefix}[{i}]").items()}
    return {prefix: x}


def _run(name: str, device: torch.device) -> dict[str, Any]:
    fn, build = _cases()[name]
    args = _to(build(torch.Generator().manual_seed(zlib.crc32(name.encode()))), device)
    return _leaves(fn(*args))


@pytest.mark.parametrize("name", sorted(_cases()))
def test_cases_run_on_the_cpu(name):
    out = _run(name, torch.device("cpu"))
    assert out
    for key, v in out.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.isfinite(v).all(), (name, key)


def test_every_loss_has_a_case():
    assert set(_cases()) >= set(L.__all__) - {"EmptyMaskError", "sela_label_step", "label_step_plan"}


@needs_cuda
@pytest.mark.parametrize("name", sorted(_cases()))
def test_loss_on_cuda_equals_cpu(name):
    cpu, gpu = _run(name, torch.device("cpu")), _run(name, torch.device("cuda"))
    assert cpu.keys() == gpu.keys()
    for key, a in cpu.items():
        b = gpu[key]
        if not isinstance(a, torch.Tensor):
            assert a == b, (name, key)
            continue
        assert b.device.type == "cuda" or b.numel() == 0 or a.dtype == b.dtype, (name, key)
        b = b.cpu()
        if a.is_floating_point():
            torch.testing.assert_close(b.to(a.dtype), a, rtol=1e-5, atol=1e-5, msg=f"{name}{key}")
        else:
            # labels from an argmax: continuous random inputs have no ties, allow one flip in a hundred
            assert (a == b).float().mean() >= 0.99, (name, key)


@needs_cuda
def test_sela_label_step_on_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    feats, w, bias = torch.randn(500, 16, generator=g), torch.randn(10, 16, generator=g), torch.randn(10, generator=g)
    a = L.sela_label_step(feats, w, bias, device="cpu")[0]   # (labels, r, c): the labels
    b = L.sela_label_step(feats, w, bias, device="cuda")[0]
    assert (a.cpu() == b.cpu()).float().mean() >= 0.99


def _draws(device: str) -> list:
    import random

    import numpy as np

    return [random.random(), float(np.random.rand()), torch.rand(3).tolist(),
            torch.rand(3, device=device).tolist() if device != "cpu" else None]


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_seed_everything_seeds_what_torch_manual_seed_seeds(seed: int) -> None:
    import random

    import numpy as np

    from ncd.utils import seed_everything

    device = "cuda" if torch.cuda.is_available() else "cpu"
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    want = _draws(device)
    _draws(device)  # move every stream on
    seed_everything(seed)
    assert _draws(device) == want
