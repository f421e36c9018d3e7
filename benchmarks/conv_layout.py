"""What ``runtime.channels_last`` buys: one training step (forward, backward, SGD) of a backbone in PyTorch's
NCHW layout and in channels-last, timed in alternating rounds, on the CPU (and on the GPU when CUDA is
available, in bf16 autocast).

    python benchmarks/conv_layout.py                          # the embedded default's small CNN on 8x8 digits
    python benchmarks/conv_layout.py --backbone resnet18_cifar --size 32 --batch 256 --steps 2

Columns: device, batch, milliseconds per step in each layout (medians over ``--rounds`` rounds of ``--steps``
steps) and × = the median of the rounds' NCHW / channels-last ratios (> 1: channels-last is faster).
"""

from __future__ import annotations

import argparse
import copy

import torch

from ncd.models import build_backbone
from ncd.utils import keep_freed_memory

from _timing import paired  # benchmarks/ is on sys.path


def step_fn(net: torch.nn.Module, x: torch.Tensor, steps: int, bf16: bool):
    """``steps`` SGD steps of ``net`` on ``x`` (a sum-of-squares loss: the layout, not the loss, is measured)."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def run() -> None:
        for _ in range(steps):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = net(x).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--width", type=int, default=32, help="small_cnn's width (default 32, the embedded default's)")
    p.add_argument("--channels", type=int, default=1, help="input channels (default 1: digits)")
    p.add_argument("--size", type=int, default=8, help="image side (default 8: digits)")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1, as make run's jobs)")
    a = p.parse_args()
    keep_freed_memory()  # as every `python -m ncd` stage does (ncd.utils.keep_freed_memory)
    torch.set_num_threads(a.threads)
    kwargs = {"width": a.width, "pool": 2} if a.backbone == "small_cnn" else {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{a.backbone} {kwargs or ''} on {a.channels}x{a.size}x{a.size} inputs; torch threads {torch.get_num_threads()}; "
          f"ms per training step, medians of {a.rounds} alternating rounds of {a.steps} steps")
    print(f"{'device':<14} {'batch':>6} {'NCHW':>9} {'channels_last':>14} {'×':>6}")
    for dev in devices:
        for batch in a.batch:
            torch.manual_seed(0)
            net, _ = build_backbone(a.backbone, a.channels, **kwargs)
            net = net.to(dev)
            net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
            x = torch.randn(batch, a.channels, a.size, a.size, device=dev)
            bf16 = dev == "cuda"
            t_nchw, t_cl, ratio = paired(step_fn(net, x, a.steps, bf16), step_fn(net_cl, x, a.steps, bf16), a.rounds)
            label = dev if dev == "cpu" else "cuda (bf16)"
            print(f"{label:<14} {batch:>6} {t_nchw / a.steps * 1e3:>9.1f} {t_cl / a.steps * 1e3:>14.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
