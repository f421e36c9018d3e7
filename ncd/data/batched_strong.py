"""SCAN's strong augmentation ("ours": flip → RandomCrop → 4 of 14 PIL ops → normalise → Cutout,
:func:`ncd.data.transforms.build_transform` ``"strong"``) for a whole uint8 batch on its device.

Each image's parameters (flip, crop offset, the op of each slot with its magnitude and sign, the
Cutout square) come from the counter-based generator of :mod:`ncd.data.batched`, keyed by
``(seed, epoch, index, view)``, and follow the PIL path's distributions. The ops work on the 8-bit
grid as PIL does (each rounds or truncates where PIL's C code does); one slot at a time, each op
runs once on the images that drew it. From libraries: torchvision's batched ``equalize`` and
``autocontrast`` (written to match PIL's). Written here, because no library takes a different
magnitude per image: the blends of ``ImageEnhance`` (Color, Contrast, Brightness, Sharpness),
Solarize and Posterize with per-image thresholds, and PIL's nearest-neighbour affine transform
(Rotate, Shear, Translate) as one gather with PIL's coordinate convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF2

from ncd.data.batched import center_views, key_hash, simclr_views, uniform, view_options
from ncd.data.registry import DatasetInfo
from ncd.data.transforms import OPS
from ncd.errors import NcdError

OP_NAMES: tuple[str, ...] = tuple(OPS)
# parameter columns: flip, crop top, crop left; per slot (op id, magnitude); Cutout side, centre y, x
S_FLIP, S_TOP, S_LEFT = 0, 1, 2


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of an RGB image on the 0..255 grid (its fixed-point ITU-R 601-2)."""
    if x.shape[1] == 1:
        return x
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, img, factor)``: ``degenerate + factor·(img − degenerate)``, in float32
    and truncated to the 8-bit grid as PIL's ``ImagingBlend``."""
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    return torch.clamp(torch.trunc(degenerate + f * (img - degenerate)), 0, 255)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """``ImageFilter.SMOOTH`` (3×3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13), the border pixels kept."""
    c = x.shape[1]
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    inner = F.conv2d(x, k.expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = torch.clamp(torch.round(inner), 0, 255)
    return out


def affine_nearest(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, (a, b, c, d, e, f))`` with NEAREST, per image: output
    pixel ``(i, j)`` reads input ``(⌊a(i+½) + b(j+½) + c⌋, ⌊d(i+½) + e(j+½) + f⌋)``, 0 outside.
    ``x``: ``[N, C, H, W]``, ``coeffs``: ``[N, 6]``."""
    n, c, h, w = x.shape
    cf = coeffs.to(device=x.device, dtype=torch.float64)
    xs = torch.arange(w, device=x.device, dtype=torch.float64) + 0.5
    ys = torch.arange(h, device=x.device, dtype=torch.float64) + 0.5
    a, b, cc, d, e, f = (cf[:, k].view(n, 1, 1) for k in range(6))
    xin = torch.floor(a * xs.view(1, 1, w) + b * ys.view(1, h, 1) + cc)
    yin = torch.floor(d * xs.view(1, 1, w) + e * ys.view(1, h, 1) + f)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    flat = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).long().view(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(x.reshape(n, c, h * w), 2, flat).view(n, c, h, w)
    return torch.where(inside.view(n, 1, h, w), out, torch.zeros_like(out))


def _rotation(v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The affine coefficients of ``img.rotate(v)`` (degrees, counter-clockwise about the centre)."""
    t = -v.to(torch.float64) * math.pi / 180
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2.0, h / 2.0
    a, b, d, e = cos, sin, -sin, cos
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return torch.stack([a, b, c, d, e, f], dim=1)


def apply_op_batch(x: torch.Tensor, name: str, v: torch.Tensor) -> torch.Tensor:
    """Op ``name`` of :data:`ncd.data.transforms.OPS` on ``[N, C, H, W]`` values on the 0..255 grid,
    each image with its own magnitude ``v[i]`` (as ``apply_op(img, name, v[i])``)."""
    n, _, h, w = x.shape
    one, zero = torch.ones_like(v, dtype=torch.float64), torch.zeros_like(v, dtype=torch.float64)
    v64 = v.to(torch.float64)
    if name == "Identity":
        return x
    if name == "AutoContrast":
        return TF2.autocontrast(x.to(torch.uint8)).float()
    if name == "Equalize":
        return TF2.equalize(x.to(torch.uint8)).float()
    if name == "Rotate":
        return affine_nearest(x, _rotation(v64, h, w))
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
        cols = {"ShearX": [one, v64, zero, zero, one, zero], "ShearY": [one, zero, zero, v64, one, zero],
                "TranslateX": [one, zero, v64 * w, zero, one, zero], "TranslateY": [one, zero, zero, zero, one, v64 * h]}
        return affine_nearest(x, torch.stack(cols[name], dim=1))
    if name == "Solarize":
        return torch.where(x < v64.view(-1, 1, 1, 1).to(x.dtype), x, 255 - x)
    if name == "Posterize":
        bits = torch.trunc(v64).long().view(-1, 1, 1, 1)
        mask = (255 << (8 - bits)) & 255
        return (x.long() & mask).to(x.dtype)
    if name == "Color":
        return _blend(_luma(x).expand_as(x), x, v)
    if name == "Contrast":
        mean = torch.floor(_luma(x).mean(dim=(1, 2, 3)) + 0.5).view(-1, 1, 1, 1)
        return _blend(mean.expand_as(x), x, v)
    if name == "Brightness":
        return _blend(torch.zeros_like(x), x, v)
    if name == "Sharpness":
        return _blend(_smooth(x), x, v)
    raise NcdError(f"unknown augmentation op '{name}'; expected one of: {', '.join(OP_NAMES)}")


class StrongViews(torch.nn.Module):
    """SCAN's ``strong`` view for a uint8 batch on its device: ``params(keys, H, W)`` draws each image's
    parameters from ``(seed, epoch, index, view)``, ``apply(images, params)`` applies them,
    ``forward(images, keys)`` does both."""

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float], *, flip_p: float = 0.5,
                 num_ops: int = 4, ops: Sequence[str] | None = None, cutout: int = 0, seed: int = 0,
                 view: int = 0) -> None:
        super().__init__()
        self.size, self.flip_p, self.num_ops, self.cutout = int(crop_size), float(flip_p), int(num_ops), int(cutout)
        self.ops = tuple(OP_NAMES if ops is None else ops)
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise NcdError(f"unknown augmentation op(s) {', '.join(unknown)}; expected some of: {', '.join(OPS)}")
        if self.cutout < 0:
            raise NcdError(f"cutout length must be >= 0, got {self.cutout}")
        self.seed, self.view = int(seed), int(view)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        # parameter columns after flip, top, left: (op, magnitude) per slot, then the Cutout square
        self.s_ops = 3
        self.s_cut = 3 + 2 * self.num_ops
        self.num_params = self.s_cut + 3
        # draws: flip, top, left; per slot choice, magnitude, sign; Cutout side, y, x
        self.num_draws = 3 + 3 * self.num_ops + 3

    def params(self, keys: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, num_params]`` float64 from the key rows ``(epoch, index)`` (``[B, 2]`` int64)."""
        if height < self.size or width < self.size:
            raise NcdError(f"strong augmentation crops {self.size}×{self.size} from {height}×{width} images; "
                           "expected images at least the crop size")
        u = uniform(key_hash(self.seed, keys[:, 0], keys[:, 1], self.view), self.num_draws)
        p = torch.zeros(u.shape[0], self.num_params, dtype=torch.float64, device=u.device)
        p[:, S_FLIP] = (u[:, 0] < self.flip_p).double()
        # RandomCrop.get_params: randint(0, H − S + 1), randint(0, W − S + 1)
        p[:, S_TOP] = torch.floor(u[:, 1] * (height - self.size + 1))
        p[:, S_LEFT] = torch.floor(u[:, 2] * (width - self.size + 1))
        lo = torch.tensor([OPS[o][1] or 0.0 for o in self.ops], dtype=torch.float64, device=u.device)
        hi = torch.tensor([OPS[o][2] or 0.0 for o in self.ops], dtype=torch.float64, device=u.device)
        signed = torch.tensor([OPS[o][3] for o in self.ops], device=u.device)
        for k in range(self.num_ops):
            choice = torch.clamp(torch.floor(u[:, 3 + 3 * k] * len(self.ops)), max=len(self.ops) - 1).long()
            mag = lo[choice] + (hi[choice] - lo[choice]) * u[:, 4 + 3 * k]
            mag = torch.where(signed[choice] & (u[:, 5 + 3 * k] < 0.5), -mag, mag)
            p[:, self.s_ops + 2 * k] = choice.double()
            p[:, self.s_ops + 2 * k + 1] = mag
        d = 3 + 3 * self.num_ops
        if self.cutout:
            p[:, self.s_cut] = 1 + torch.floor(u[:, d] * self.cutout)            # randint(1, length)
            p[:, self.s_cut + 1] = torch.floor(u[:, d + 1] * self.size)           # randrange(h)
            p[:, self.s_cut + 2] = torch.floor(u[:, d + 2] * self.size)           # randrange(w)
        return p

    def crop(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Flip where set, then each image's ``S × S`` window at its offset (one gather)."""
        b, c, h, w = x.shape
        p = params.to(x.device)
        flip = (p[:, S_FLIP] > 0.5).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        r = torch.arange(self.size, device=x.device)
        rows = (p[:, S_TOP].long().view(b, 1) + r.view(1, -1))             # [B, S]
        cols = (p[:, S_LEFT].long().view(b, 1) + r.view(1, -1))
        flat = (rows.view(b, self.size, 1) * w + cols.view(b, 1, self.size)).view(b, 1, -1).expand(b, c, -1)
        return torch.gather(x.reshape(b, c, h * w), 2, flat).view(b, c, self.size, self.size)

    def ops_(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The ``num_ops`` slots in order; in each, every op runs once on the images that drew it."""
        p = params.to(x.device)
        x = x.clone()  # written in place below
        for k in range(self.num_ops):
            choice = p[:, self.s_ops + 2 * k].long()
            mag = p[:, self.s_ops + 2 * k + 1]
            for j, name in enumerate(self.ops):
                idx = torch.nonzero(choice == j).flatten()
                if idx.numel() and name != "Identity":
                    x[idx] = apply_op_batch(x[idx], name, mag[idx])
        return x

    def cut(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Cutout: zero each image's square (side, centre from its parameters), clipped at the border."""
        if not self.cutout:
            return x
        b, _, h, w = x.shape
        p = params.to(x.device)
        side, cy, cx = p[:, self.s_cut], p[:, self.s_cut + 1], p[:, self.s_cut + 2]
        y0, x0 = cy - torch.floor(side / 2), cx - torch.floor(side / 2)
        ys = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
        xs = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
        hole = ((ys >= y0.view(b, 1, 1)) & (ys < (y0 + side).view(b, 1, 1))
                & (xs >= x0.view(b, 1, 1)) & (xs < (x0 + side).view(b, 1, 1)))
        return x.masked_fill(hole.view(b, 1, h, w), 0.0)

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` and ``[B, num_params]`` → normalised float ``[B, C, S, S]``."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise NcdError(f"batched augmentation takes a uint8 batch [B, C, H, W], got {images.dtype} "
                           f"{list(images.shape)}")
        x = self.ops_(self.crop(images.float(), params), params)
        x = (x / 255.0 - self.mean.to(x.device)) / self.std.to(x.device)
        return self.cut(x, params)

    def forward(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The views of a uint8 batch whose images have the key rows ``(epoch, index)``."""
        return self.apply(images, self.params(keys, images.shape[-2], images.shape[-1]))


def strong_views(info: DatasetInfo, seed: int = 0, view: int = 0, **overrides: Any) -> StrongViews:
    """The batched counterpart of ``build_transform("strong", info, **overrides)`` (same defaults),
    drawing from ``(seed, epoch, index, view)``."""
    o = view_options("strong", overrides)
    cutout = info.cutout if o["cutout"] is None else o["cutout"]
    return StrongViews(o["crop_size"] or info.crop_size, info.mean, info.std, flip_p=o["flip_p"],
                       num_ops=o["num_ops"], cutout=int(cutout or 0), seed=seed, view=view)


def device_views(kind: str, info: DatasetInfo, seed: int = 0, view: int = 0,
                 **overrides: Any) -> torch.nn.Module:
    """The batched counterpart of ``build_transform(kind, info, **overrides)``: ``simclr``, ``strong`` or
    ``val``/``weak``; called as ``views(uint8 images, keys)``."""
    if kind == "simclr":
        return simclr_views(info, seed=seed, view=view, **overrides)
    if kind == "strong":
        return strong_views(info, seed=seed, view=view, **overrides)
    if kind in ("val", "weak"):
        return center_views(info, **overrides)
    raise NcdError(f"unknown transform kind '{kind}'; expected one of: simclr, strong, val, weak")


__all__ = ["OP_NAMES", "StrongViews", "affine_nearest", "apply_op_batch", "device_views", "strong_views"]
