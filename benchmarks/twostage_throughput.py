"""Stage-2 training throughput of the two-stage classifier (images/s): ResNet18withSobel at batch 128
on CIFAR-size inputs (the paper's setting), and the digits default (Sobel small CNN, batch 64), on
whatever device is present. Prints one line per case.

    python benchmarks/twostage_throughput.py [--device cpu|cuda] [--steps N] [--batch B] [--threads T]

"images/s" counts source images; each is seen as two augmented views (2B rows per step). Figures:
  step    - forward of both views, twostage_loss (5 fixed heads + L_cp), backward and the Nesterov
            SGD step on the encoder only, on ready tensors (the model's own cost)
  loader  - Super-AND's per-image augmentation of PIL images, two views, one process
"""

from __future__ import annotations

import argparse

import torch
from _timing import (  # benchmarks/ is on sys.path
    images_per_second,
    transform_pairs_per_second,
)

from ncd.data import get_info
from ncd.losses import twostage_loss
from ncd.models import ResNet18withSobel
from ncd.models.sobel import TwoStageModel
from ncd.utils import keep_freed_memory


def step_throughput(backbone: str, in_ch: int, size: int, batch: int, steps: int, device: str, classes: int,
                    **kw) -> float:
    model = TwoStageModel(ResNet18withSobel(128, in_ch, backbone, kw), classes, num_heads=5).to(device).train()
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x = torch.randn(2 * batch, in_ch, size, size, device=device)

    def step() -> None:
        loss = twostage_loss(model.encoder(x), model.head_weights)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return images_per_second(step, batch, steps, device)


def loader_throughput(dataset: str, n: int, **overrides) -> float:
    from ncd.data import build_transform
    from ncd.methods.superand import SAND_AUGMENT

    info = get_info(dataset)
    t = build_transform("simclr", info, **{**SAND_AUGMENT, **overrides})
    return transform_pairs_per_second(t, info, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 3 on CPU, 50 on GPU)")
    p.add_argument("--batch", type=int, default=128, help="images per step for ResNet18withSobel (the paper's 128)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    keep_freed_memory()  # as every `python -m ncd` stage does (ncd.utils.keep_freed_memory)
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = a.steps or (3 if a.device == "cpu" else 50)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}")
    cases = [(f"ResNet18withSobel (CIFAR-10 32x32), batch {a.batch}", "resnet18_cifar", 3, 32, a.batch, 10, {},
              "cifar10", {}),
             ("Sobel small_cnn w16 (digits 8x8), batch 64", "small_cnn", 1, 8, 64, 10, {"width": 16, "pool": 2},
              "digits", {"crop_scale": (0.6, 1.0), "flip_p": 0.0, "jitter": (0.4, 0.4, 0.0, 0.0), "jitter_p": 0.8})]
    for name, bb, ch, size, batch, classes, kw, ds, aug in cases:
        s = step_throughput(bb, ch, size, batch, steps if bb != "small_cnn" else max(steps, 20), a.device, classes, **kw)
        ld = loader_throughput(ds, 1000 if a.device == "cpu" else 5000, **aug)
        print(f"{name:48s} step {s:9.1f} images/s   loader {ld:8.1f} images/s (1 process)")


if __name__ == "__main__":
    main()
