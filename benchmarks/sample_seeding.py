"""Per-sample cost of the exact-resume seeding (``ncd.methods.common.SeededItems``): every training
sample reseeds torch's CPU generator, ``random`` and NumPy from (seed, epoch, index) before it is
loaded. Prints microseconds per sample for that, for a full ``torch.manual_seed`` (which also seeds
every accelerator), and for loading a digits sample with SCAN's strong augmentation, for scale.

    python benchmarks/sample_seeding.py
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import Dataset

from ncd.data import build_dataset, build_transform, get_info
from ncd.data.wrappers import Transformed
from ncd.methods.common import SeededItems, derive_seed
from ncd.utils import seed_everything


class _Nothing(Dataset):
    def __len__(self) -> int:
        return 1 << 20

    def __getitem__(self, i: int) -> int:
        return i


def _per_item_us(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    n = 5000
    items = SeededItems(_Nothing(), 0)
    print(f"SeededItems reseeding (CPU generator, random, NumPy): {_per_item_us(lambda i: items[(1, i)], n):.1f} us/sample")
    print(f"full seed_everything (torch.manual_seed incl. accelerators): "
          f"{_per_item_us(lambda i: seed_everything(derive_seed(0, 1, i)), n):.1f} us/sample")
    info = get_info("digits")
    base = Transformed(build_dataset("digits", "data/digits", info.train_split), build_transform("strong", info))
    print(f"loading one digits sample with SCAN's strong augmentation: "
          f"{_per_item_us(lambda i: base[i % len(base)], 1000):.1f} us/sample")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
