"""Timing loops shared by the throughput benchmarks (imported as a sibling module)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


def images_per_second(step: Callable[[], None], batch: int, steps: int, device: str) -> float:
    """Run ``step`` twice to warm up (cuDNN autotune, allocator), then time ``steps`` calls."""
    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def transform_pairs_per_second(transform: Callable, info, n: int) -> float:
    """Two augmented views per image, ``n`` images, on 64 random PIL images of the dataset's shape."""
    mode = "L" if info.channels == 1 else "RGB"
    rng = np.random.default_rng(0)
    shape = (info.image_size, info.image_size) + (() if info.channels == 1 else (3,))
    imgs = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(64)]
    t0 = time.perf_counter()
    for i in range(n):
        transform(imgs[i % 64]), transform(imgs[i % 64])
    return n / (time.perf_counter() - t0)


def paired(a: Callable[[], None], b: Callable[[], None], rounds: int) -> tuple[float, float, float]:
    """Seconds of ``a`` and of ``b`` (medians) and the median of the per-round ratios ``a / b``, the two
    timed alternately after one warm-up each: on a shared machine both then see the same slowdowns."""
    a()
    b()
    ta, tb = [], []
    for _ in range(rounds):
        for fn, ts in ((a, ta), (b, tb)):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))
