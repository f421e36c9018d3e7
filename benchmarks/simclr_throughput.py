"""SimCLR training throughput (images/s) for ResNet-18 (CIFAR stem) at batch 256 and for the CPU
default backbone, on whatever device is present. Prints one line per case.

    python benchmarks/simclr_throughput.py [--device cpu|cuda] [--steps N] [--batch B]

"images/s" counts source images per second; each image is seen as two augmented views, so the
network processes twice as many. Two figures per case:
  step    - forward + backward + SGD step on ready tensors (the model's own cost)
  loader  - the SCAN SimCLR augmentation of PIL images (the per-image data path), one process
"""

from __future__ import annotations

import argparse

import torch
from _timing import (  # benchmarks/ is on sys.path
    images_per_second,
    transform_pairs_per_second,
)

from ncd.data import build_transform, get_info
from ncd.losses import simclr_loss
from ncd.models import ContrastiveModel, build_backbone
from ncd.utils import keep_freed_memory


def step_throughput(backbone: str, in_ch: int, size: int, batch: int, steps: int, device: str,
                    precision: str, **kw) -> float:
    bb, dim = build_backbone(backbone, in_ch, **kw)
    model = ContrastiveModel(bb, dim).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch * 2, in_ch, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            z = model(x).float().view(batch, 2, -1)
            loss = simclr_loss(z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return images_per_second(step, batch, steps, device)


def loader_throughput(dataset: str, n: int, **overrides) -> float:
    info = get_info(dataset)
    t = build_transform("simclr", info, **overrides)
    return transform_pairs_per_second(t, info, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 3 on CPU, 50 on GPU)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    a = p.parse_args()
    keep_freed_memory()  # as every `python -m ncd` stage does (ncd.utils.keep_freed_memory)
    steps = a.steps or (3 if a.device == "cpu" else 50)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; batch {a.batch}; precision {a.precision}")
    cases = [("resnet18_cifar (CIFAR-10 32x32)", "resnet18_cifar", 3, 32, {}, "cifar10", {}),
             ("small_cnn (digits 8x8, CPU default)", "small_cnn", 1, 8, {"width": 32, "pool": 2}, "digits",
              {"crop_scale": (0.6, 1.0), "flip_p": 0.0, "jitter": (0.4, 0.4, 0.0, 0.0), "grayscale_p": 0.0})]
    for name, bb, ch, size, kw, ds, aug in cases:
        s = step_throughput(bb, ch, size, a.batch, steps, a.device, a.precision, **kw)
        ld = loader_throughput(ds, 2000 if a.device == "cpu" else 5000, **aug)
        print(f"{name:38s} step {s:9.1f} images/s   loader {ld:8.1f} images/s (1 process)")


if __name__ == "__main__":
    main()
