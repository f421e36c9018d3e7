"""UNO's CIFAR-style ``large`` and ``small`` crops (:func:`ncd.data.uno.build_uno_transform`) for a whole
uint8 batch on its device (``augment.backend: batched``).

large: RandomChoice(RandomCrop(size, padding), RandomResizedCrop(size, (0.5, 1))) → flip → ColorJitter
(0.4, 0.4, 0.2, 0.1) with p → Solarize (threshold ~ U[0, 256)) with p → Equalize with p → normalise;
small: RandomResizedCrop(small_size, (0.3, 0.8)) and the same tail. Each image's parameters come from
the counter-based generator of :mod:`ncd.data.batched`, keyed by ``(seed, epoch, index, view)``: the
resized crop, flip and jitter are :class:`~ncd.data.batched.SimCLRViews`' (the same draws and pixel
ops), the crop choice, padded-crop offset, Solarize and Equalize draws a second stream of the same
key. Equalize is torchvision's batched one (written to match PIL's), Solarize the per-image
threshold of :func:`ncd.data.batched_strong.apply_op_batch`. UNO's ImageNet pipeline (Gaussian blur,
grayscale) has no batched path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ncd.data.batched import NUM_PARAMS, P_FLIP, SimCLRViews, key_hash, uniform
from ncd.data.batched_strong import apply_op_batch
from ncd.data.registry import DatasetInfo
from ncd.data.uno import UNO_NORM, _imagenet_like, _options
from ncd.errors import NcdError

#: UNO's ColorJitter (both crops, CIFAR and ImageNet pipelines)
UNO_JITTER = (0.4, 0.4, 0.2, 0.1)
_STREAM = 0x554E4F  # keys the second stream ("UNO") apart from SimCLRViews' draws of the same image
# the extra parameter columns after SimCLRViews' NUM_PARAMS: padded crop chosen, its top, left,
# Solarize applied, its threshold, Equalize applied
U_CHOICE, U_TOP, U_LEFT, U_SOL, U_THR, U_EQ = range(6)


class UNOViews(torch.nn.Module):
    """One UNO crop kind (``large`` or ``small``) for a uint8 batch; ``params(keys, H, W)``,
    ``apply(images, params)``, ``forward(images, keys)`` as :class:`~ncd.data.batched.SimCLRViews`."""

    def __init__(self, kind: str, size: int, mean: Sequence[float], std: Sequence[float], *, padding: int = 0,
                 flip_p: float = 0.5, jitter_p: float = 0.6, solarize_p: float = 0.1, equalize_p: float = 0.1,
                 seed: int = 0, view: int = 0) -> None:
        super().__init__()
        if kind not in ("large", "small"):
            raise NcdError(f"unknown UNO crop kind {kind!r}; expected 'large' or 'small'")
        self.kind, self.size, self.padding = kind, int(size), int(padding)
        self.solarize_p, self.equalize_p = float(solarize_p), float(equalize_p)
        self.seed, self.view = int(seed), int(view)
        scale = (0.5, 1.0) if kind == "large" else (0.3, 0.8)
        self.rrc = SimCLRViews(self.size, mean, std, crop_scale=scale, flip_p=flip_p, jitter=UNO_JITTER,
                               jitter_p=jitter_p, grayscale_p=0.0, seed=seed, view=view)

    def params(self, keys: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, NUM_PARAMS + 6]`` float64: SimCLRViews' row, then the columns ``U_*``."""
        p = self.rrc.params(keys, height, width)
        u = uniform(key_hash(self.seed, keys[:, 0], keys[:, 1], self.view, _STREAM), 6)
        extra = torch.zeros(p.shape[0], 6, dtype=torch.float64, device=p.device)
        if self.kind == "large":
            # RandomChoice: random.choice of the two; RandomCrop.get_params on the padded image
            extra[:, U_CHOICE] = (u[:, 0] < 0.5).double()
            extra[:, U_TOP] = torch.floor(u[:, 1] * (height + 2 * self.padding - self.size + 1))
            extra[:, U_LEFT] = torch.floor(u[:, 2] * (width + 2 * self.padding - self.size + 1))
        extra[:, U_SOL] = (u[:, 3] < self.solarize_p).double()
        extra[:, U_THR] = u[:, 4] * 256.0  # random.uniform(0, 256)
        extra[:, U_EQ] = (u[:, 5] < self.equalize_p).double()
        return torch.cat([p, extra], dim=1)

    def padded_crop(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """RandomCrop(size, padding) (zero padding) at each image's offset, flipped where set."""
        b, c, h, w = x.shape
        pad, s = self.padding, self.size
        xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
        hp, wp = h + 2 * pad, w + 2 * pad
        if hp < s or wp < s:
            raise NcdError(f"UNO's RandomCrop takes {s}×{s} from {h}×{w} images padded by {pad}; expected "
                           "images at least the crop size")
        e = params[:, NUM_PARAMS:].to(x.device)
        r = torch.arange(s, device=x.device)
        rows = e[:, U_TOP].long().view(b, 1) + r.view(1, -1)
        cols = e[:, U_LEFT].long().view(b, 1) + r.view(1, -1)
        flat = (rows.view(b, s, 1) * wp + cols.view(b, 1, s)).view(b, 1, -1).expand(b, c, -1)
        out = torch.gather(xp.reshape(b, c, hp * wp), 2, flat).view(b, c, s, s)
        flip = (params[:, P_FLIP].to(x.device) > 0.5).view(b, 1, 1, 1)
        return torch.where(flip, out.flip(-1), out)

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` and ``[B, NUM_PARAMS + 6]`` → normalised float ``[B, C, S, S]``."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise NcdError(f"batched augmentation takes a uint8 batch [B, C, H, W], got {images.dtype} "
                           f"{list(images.shape)}")
        # a channels-last batch (a permuted HWC array) made contiguous as uint8: every step below is
        # elementwise or a per-image product, and runs 1.5x slower on the strided layout
        x = images.contiguous().float().div_(255.0)
        e = params[:, NUM_PARAMS:].to(x.device)
        out = self.rrc.resized_crop(x, params)
        if self.kind == "large":
            out = torch.where((e[:, U_CHOICE] > 0.5).view(-1, 1, 1, 1), self.padded_crop(x, params), out)
        out = self.rrc.color(out, params)
        g = torch.round(out * 255.0)  # on the 8-bit grid, as PIL's Solarize and Equalize see it
        sol = (e[:, U_SOL] > 0.5).view(-1, 1, 1, 1)
        g = torch.where(sol, apply_op_batch(g, "Solarize", e[:, U_THR]), g)
        idx = torch.nonzero(e[:, U_EQ] > 0.5).flatten()
        if idx.numel():
            g = g.index_put((idx,), apply_op_batch(g[idx], "Equalize", e[idx, U_THR]))
        x = g / 255.0
        return (x - self.rrc.mean.to(x.device)) / self.rrc.std.to(x.device)

    def forward(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.params(keys, images.shape[-2], images.shape[-1]))


def build_uno_views(kind: str, info: DatasetInfo, seed: int = 0, view: int = 0, **overrides: Any) -> UNOViews:
    """The batched counterpart of ``build_uno_transform(kind, info, **overrides)`` for ``large`` and
    ``small`` on CIFAR-style datasets (same options and defaults), drawing from ``(seed, epoch, index, view)``."""
    o = _options(kind, info, overrides)
    if kind == "eval":
        raise NcdError("UNO's eval transform has no random draws; expected 'large' or 'small' for batched views")
    if _imagenet_like(info):
        raise NcdError(f"UNO's ImageNet augmentation (Gaussian blur, grayscale) of {info.name!r} has no batched "
                       "path; expected augment.backend: pil")
    mean, std = UNO_NORM.get(info.name, (info.mean, info.std))
    size = o["size"] if kind == "large" else o["small_size"]
    return UNOViews(kind, size, mean, std, padding=o["padding"], flip_p=o["flip_p"], jitter_p=o["jitter_p"],
                    solarize_p=o["solarize_p"], equalize_p=o["equalize_p"], seed=seed, view=view)


__all__ = ["UNOViews", "UNO_JITTER", "build_uno_views"]
