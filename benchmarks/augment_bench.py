"""Augmentation throughput, PIL path vs batched path, side by side (issue 17).

    python benchmarks/augment_bench.py [--threads 2] [--batch 512] [--train-steps 3]

Part 1, per augmentation (SCAN's SimCLR view, SCAN's strong augmentation: 4 of 14 ops + Cutout, UNO's
multicrop: 2 large + 2 small crops per image, ``ncd.data.batched_uno``) and
dataset shape (digits 8×8 L, CIFAR 32×32 RGB): images/s of the PIL transform (``build_transform``:
what one DataLoader worker does per image) against the batched path (``ncd.data.batched``,
``ncd.data.batched_strong``: parameters drawn from (seed, epoch, index) and applied to a uint8 batch)
on the CPU with ``--threads`` threads and, when CUDA is available, on the GPU.

Part 2: SimCLR training images/s on CIFAR-10-shaped data with a CIFAR ResNet-18 at ``--batch``:
the PIL loader (DataLoader workers = CPUs, two views per image) vs the batched path (uint8 batches,
views made on the training device), channels_last; on a GPU in bf16, else on the CPU in fp32 (few steps).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from ncd.data import build_transform
from ncd.data.batched import apply_views, simclr_views
from ncd.data.batched_strong import device_views
from ncd.data.batched_uno import build_uno_views
from ncd.data.uno import build_uno_transform
from ncd.data.registry import get_info
from ncd.data.wrappers import MultiView
from ncd.utils import keep_freed_memory

from _timing import paired  # benchmarks/ is on sys.path


def images(kind: str, n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    if kind == "digits":
        return [Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), "L") for _ in range(n)]
    return [Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(n)]


def augment_rates(batch: int, repeat: int) -> None:
    print(f"View augmentation, images/s (batch {batch}, medians of {repeat} alternating rounds; "
          f"torch threads {torch.get_num_threads()}; × = median of the rounds' ratios)")
    print(f"{'augmentation':<14} {'data':<7} {'PIL, 1 process':>15} {'batched, CPU':>13} {'CPU ×':>6} "
          f"{'batched, GPU':>13} {'GPU ×':>7}")
    for kind in ("simclr", "strong", "uno"):
        for data, ds in (("digits", "digits"), ("cifar", "cifar10")):
            info = get_info(ds, "data")
            imgs = images(data, batch)
            # [B, C, H, W] contiguous, as the loader's collate stacks RawImages' tensors
            x = torch.stack([torch.from_numpy(np.asarray(im).copy()).reshape(im.size[1], im.size[0], -1).permute(2, 0, 1)
                             for im in imgs]).contiguous()
            keys = torch.stack([torch.zeros(batch, dtype=torch.long), torch.arange(batch)], dim=1)
            if kind == "uno":  # one image's four crops, PIL and batched
                crops = ["large", "large", "small", "small"]
                ts = [build_uno_transform(c, info) for c in crops]
                vs = [build_uno_views(c, info, seed=0, view=k) for k, c in enumerate(crops)]

                def pil_pass() -> None:
                    [[t(im) for t in ts] for im in imgs]

                def batched(xx: torch.Tensor, kk: torch.Tensor) -> list[torch.Tensor]:
                    return [v(xx, kk) for v in vs]
            else:
                t = build_transform(kind, info)

                def pil_pass() -> None:
                    [t(im) for im in imgs]

                batched = device_views(kind, info, seed=0)
            t_pil, t_cpu, ratio = paired(pil_pass, lambda: batched(x, keys), repeat)
            pil, cpu = batch / t_pil, batch / t_cpu
            gpu_s = "-"
            gpu_x = "-"
            if torch.cuda.is_available():
                xg, kg = x.cuda(), keys.cuda()
                _, t_gpu, gpu_ratio = paired(pil_pass, lambda: batched(xg, kg), max(1, repeat // 2))
                gpu_s, gpu_x = f"{batch / t_gpu:,.0f}", f"{gpu_ratio:,.0f}"
            label = {"simclr": "SimCLR view", "strong": "SCAN strong", "uno": "UNO 2+2 crops"}[kind]
            print(f"{label:<14} {data:<7} {pil:>15,.0f} {cpu:>13,.0f} {ratio:>6.1f} {gpu_s:>13} {gpu_x:>7}")


def train_rates(batch: int, steps: int) -> None:
    from torch.utils.data import DataLoader

    from ncd.models import build_backbone

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    info = get_info("cifar10", "data")
    n = batch * (steps + 1)
    base = [(im, 0) for im in images("cifar", n)]
    net, dim = build_backbone("resnet18_cifar", 3)
    net = net.to(dev)
    head = torch.nn.Linear(dim, 128).to(dev)
    # channels-last on either device: tensor cores on GPUs, oneDNN's faster kernels on the CPU
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1)

    def step(v1: torch.Tensor, v2: torch.Tensor) -> None:
        x = torch.cat([v1, v2])
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            z = torch.nn.functional.normalize(head(net(x)), dim=1)
            sim = z @ z.t() / 0.5
            sim = sim.float().masked_fill(torch.eye(len(x), dtype=torch.bool, device=dev), -1e9)
            target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(dev)
            loss = torch.nn.functional.cross_entropy(sim, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    workers = os.cpu_count() or 1
    t = build_transform("simclr", info)
    pil_loader = DataLoader(MultiView(base, [t, t]), batch_size=batch, num_workers=workers, drop_last=True,
                            pin_memory=cuda, persistent_workers=False)

    def run_pil() -> float:
        it = iter(pil_loader)
        views, _, _ = next(it)  # warm-up (workers start)
        step(views[:, 0].to(dev), views[:, 1].to(dev))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            views, _, _ = next(it)
            views = views.to(dev, non_blocking=True)
            step(views[:, 0], views[:, 1])
        if cuda:
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0)

    raw = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im, _ in base])
    v = [simclr_views(info, seed=0, view=k) for k in range(2)]

    def run_batched() -> float:
        def one(s: int) -> None:
            sl = slice(s * batch, (s + 1) * batch)
            item = {"image": raw[sl].to(dev, non_blocking=True),
                    "key": torch.stack([torch.zeros(batch, dtype=torch.long), torch.arange(sl.start, sl.stop)], 1).to(dev)}
            views = apply_views(v, item)
            step(views[:, 0], views[:, 1])
        one(0)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(1, steps + 1):
            one(s)
        if cuda:
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0)

    where = f"GPU ({torch.cuda.get_device_name()}, bf16, channels_last)" if cuda else "CPU (fp32, channels_last)"
    print(f"\nSimCLR training, CIFAR ResNet-18, batch {batch}, {steps} timed steps, on the {where}")
    p, b = run_pil(), run_batched()
    print(f"{'PIL loader (' + str(workers) + ' workers)':<28} {p:>10,.0f} images/s")
    print(f"{'batched on the device':<28} {b:>10,.0f} images/s   ({b / p:.1f}×)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--train-steps", type=int, default=3, help="0 skips part 2")
    a = ap.parse_args()
    keep_freed_memory()  # as every `python -m ncd` stage does (ncd.utils.keep_freed_memory)
    torch.set_num_threads(a.threads)
    augment_rates(a.batch, a.repeat)
    if a.train_steps:
        train_rates(a.batch, a.train_steps)


if __name__ == "__main__":
    main()
