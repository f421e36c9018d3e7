"""NPID+CLD training throughput (images/s): the CIFAR ResNet-18 with instance and group heads at
batch 256 (the official CIFAR-10 setting: 50,000-row memory bank, full softmax, K = 128 groups,
5 k-means iterations) and the CPU default (small CNN on digits), on whatever device is present.
Prints one line per case.

    python benchmarks/cld_throughput.py [--device cpu|cuda] [--steps N] [--batch B] [--precision fp32|bf16|fp16]

"images/s" counts source images per second; each image is seen as two augmented views, so the
network processes twice as many. Two figures per case:
  step    - forward of both views, NPID + λ·CLD loss (k-means on both views), backward, SGD step and
            the two memory-bank updates, on ready tensors (the method's own cost)
  loader  - CLD's per-image PIL augmentation of the case (two views per image), one process
"""

from __future__ import annotations

import argparse

import torch
from _timing import (  # benchmarks/ is on sys.path
    images_per_second,
    transform_pairs_per_second,
)

from ncd.data import get_info
from ncd.data.cld import build_cld_transform
from ncd.losses import cld_loss, memory_bank_update, npid_loss
from ncd.models.cld import CLDModel, build_cld_backbone
from ncd.utils import keep_freed_memory


def step_throughput(backbone: str, in_ch: int, size: int, batch: int, steps: int, device: str, precision: str,
                    num_train: int, clusters: int, pool_len: int = 0, **kw) -> float:
    bb, dim = build_cld_backbone(backbone, in_ch, pool_len, **kw)
    model = CLDModel(bb, dim, 128, "linear").to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=7e-4)
    s = 1 / (128 / 3) ** 0.5
    memory = (torch.rand(num_train, 128, device=device) * 2 - 1) * s
    x1 = torch.randn(batch, in_ch, size, size, device=device)
    x2 = torch.randn(batch, in_ch, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        nonlocal memory
        index = torch.randint(0, num_train, (batch,), device=device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            f1, g1 = (t.float() for t in model(x1))
            f2, g2 = (t.float() for t in model(x2))
        loss = 0.5 * (npid_loss(f1, index, memory) + npid_loss(f2, index, memory))
        loss = loss + cld_loss(g1, g2, clusters, 0.2, 5)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        memory = memory_bank_update(memory_bank_update(memory, f2.detach(), index), f1.detach(), index)

    return images_per_second(step, batch, steps, device)


def loader_throughput(dataset: str, n: int, **overrides) -> float:
    info = get_info(dataset)
    t = build_cld_transform("npid", info, **overrides)
    return transform_pairs_per_second(t, info, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps of the ResNet case (default: 3 on CPU, 50 on GPU); the small CNN runs 10x as many")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = p.parse_args()
    keep_freed_memory()  # as every `python -m ncd` stage does (ncd.utils.keep_freed_memory)
    steps = a.steps or (3 if a.device == "cpu" else 50)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; batch {a.batch}; precision {a.precision}")
    cases = [("NPID+CLD resnet18_cifar (CIFAR-10 32x32)", "resnet18_cifar", 3, 32, 50_000, 128, 4, {}, "cifar10", {}),
             ("NPID+CLD small_cnn (digits 8x8, CPU default)", "small_cnn", 1, 8, 1257, 32, 0, {"width": 32, "pool": 2},
              "digits", {"crop_scale": (0.6, 1.0), "jitter": (0.4, 0.4, 0.0, 0.0), "flip_p": 0.0, "grayscale_p": 0.0})]
    for name, bb, ch, size, n, k, pool_len, kw, ds, aug in cases:
        s = step_throughput(bb, ch, size, a.batch, steps * (1 if bb.startswith("resnet") else 10), a.device,
                            a.precision, n, k, pool_len, **kw)
        ld = loader_throughput(ds, 2000 if a.device == "cpu" else 5000, **aug)
        print(f"{name:46s} step {s:9.1f} images/s   loader {ld:8.1f} images/s (1 process)")


if __name__ == "__main__":
    main()
