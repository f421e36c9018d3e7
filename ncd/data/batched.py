"""Batched per-sample augmentation on the training device (``augment.backend: batched``).

The PIL path augments one image at a time in DataLoader workers, its random draws seeded from
(seed, epoch, index) by :class:`~ncd.methods.common.SeededItems`. The batched path moves all of it
onto the training device, for the whole batch at once:

* the random parameters of every image come from a counter-based generator: draw ``k`` of view
  ``v`` of image ``index`` in ``epoch`` is a hash (SplitMix64, :func:`uniform`) of
  ``(seed, epoch, index, v, k)``, the same chain as :func:`~ncd.methods.common.derive_seed`. So each
  image's parameters are a function of the seed, the epoch and the sample alone (a resumed run
  draws what an uninterrupted one draws, in any batch, on any device), and they follow the PIL
  transform's distributions (the same algorithms: torchvision's ``get_params`` vectorised);
* :class:`SimCLRViews` then applies them: PIL's bilinear resampling of every image's box (crop,
  resize and flip: two batched products with per-image coefficient matrices, antialiased where a box
  shrinks), Kornia's colour operations (``kornia.enhance``'s formulas) with per-image factors, Kornia's
  grayscale, normalisation.

What Kornia lacks and is written here: its ``ColorJitter`` draws one order of the four colour
operations per batch, while torchvision draws one per image, so the order is applied slot by slot,
with brightness, contrast and saturation fused into one per-image map per slot (Kornia's formulas,
the same float operations) and hue in the closed form of the HSV round trip (:func:`hue_shift`;
Kornia's round trip took three quarters of a CIFAR view's time); its parameter generators draw from
torch's global generator, not from (seed, epoch, index); and its ``crop_and_resize`` maps box
corners onto the output's corner pixels and does not widen its filter when it shrinks, while PIL
maps pixel edges onto pixel edges, keeps to the box and antialiases, so the crop is PIL's resampling
(``ImagingResample``) written as per-image coefficient matrices. Values are rounded to the 8-bit
grid after each step, as PIL stores them, so a view agrees with the PIL ops applied with the same
parameters to within a few grey levels (tests/test_batched_augment.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from ncd.data.datasets import tv_module
from ncd.data.registry import DatasetInfo
from ncd.data.transforms import _DEFAULTS
from ncd.errors import NcdError
from ncd.ops.checks import check_options

# one row of view parameters: crop box (top, left, height, width), flip, jitter applied, the order
# of the four colour operations, their factors (brightness, contrast, saturation, hue), grayscale
P_TOP, P_LEFT, P_H, P_W, P_FLIP, P_JITTER = 0, 1, 2, 3, 4, 5
P_ORDER = slice(6, 10)
P_FACTORS = slice(10, 14)
P_GRAY = 14
NUM_PARAMS = 15
_NEUTRAL = (1.0, 1.0, 1.0, 0.0)  # the factor of each colour operation that changes nothing
_CROP_TRIES = 10  # torchvision's RandomResizedCrop attempts before its fallback

# ------------------------------------------------------------------------------------------------
# A counter-based generator: SplitMix64 on int64 tensors (torch's integer arithmetic wraps).

_MASK = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x >> k) & ((1 << (64 - k)) - 1)  # logical shift: >> on int64 keeps the sign


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def key_hash(seed: int, *keys: torch.Tensor | int) -> torch.Tensor:
    """SplitMix64 chained over ``(seed, *keys)``, elementwise: ``derive_seed(seed, *keys) << 1`` as
    a tensor (``derive_seed`` keeps the top 63 bits). Keys broadcast; the result is int64."""
    ref = next((k for k in keys if isinstance(k, torch.Tensor)), None)
    dev = ref.device if ref is not None else None
    h = _mix(torch.tensor(_signed(int(seed) & _MASK), dtype=torch.int64, device=dev))
    for k in keys:
        k = k.to(torch.int64) if isinstance(k, torch.Tensor) else torch.tensor(_signed(int(k) & _MASK),
                                                                                  device=dev)
        h = _mix(h ^ k)
    return h


def uniform(h: torch.Tensor, draws: int) -> torch.Tensor:
    """``[..., draws]`` float64 uniforms in [0, 1): draw ``k`` = the top 53 bits of ``mix(h ^ k)``."""
    k = torch.arange(draws, device=h.device, dtype=torch.int64)
    return _shr(_mix(h[..., None] ^ k), 11).to(torch.float64) * (2.0 ** -53)


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images ``x`` (``[B, 3, H, W]`` in [0, 1]) by ``shift[b]`` of the full
    circle, keeping HSV's saturation and value: what Kornia's ``adjust_hue`` (RGB → HSV, shift, HSV →
    RGB) computes, in one pass. With ``V = max``, ``C = max − min`` and the hue ``H`` in sixths of the
    circle (Kornia's case split: ties go to red, then green), channel ``n`` ∈ (R 5, G 3, B 1) is
    ``V − C·clamp(min(k, 4 − k), 0, 1)``, ``k = (n + H') mod 6`` (the closed form of HSV → RGB);
    grey pixels (``C = 0``) stay as they are."""
    # Branch-free: comparisons, torch.where and bool masks cost several times an arithmetic op on
    # the CPU. sign(channel − V) + 1 is exactly 1 where that channel is the largest and 0 elsewhere,
    # and red, then green, win ties as in Kornia's case split, so the 0/1 weights below select one case.
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    ir = torch.sign(r - v).add_(1)
    ig = torch.sign(g - v).add_(1).mul_(1 - ir)
    ib = (1 - ir).sub_(ig)
    h = (g - b).mul_(ir).add_((b - r).mul_(ig)).add_((r - g).mul_(ib))
    # grey pixels: 0 / tiny = hue 0, and C = 0 leaves them unchanged below
    h.div_(c.clamp(min=torch.finfo(x.dtype).tiny))
    h.add_(ig.mul_(2).add_(ib.mul_(4)).add_(6 * shift.to(x.dtype).view(-1, 1, 1)))
    k = h.unsqueeze(1) + torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k.sub_(torch.floor(k * (1 / 6)).mul_(6))  # mod 6 (the result is continuous across the wrap)
    w = torch.minimum(k, k.neg().add_(4)).clamp_(0.0, 1.0)
    return w.mul_(c.unsqueeze(1)).neg_().add_(v.unsqueeze(1))


class SimCLRViews(torch.nn.Module):
    """SCAN's ``simclr`` view (RandomResizedCrop → flip → colour jitter with p → grayscale with p →
    normalise, ``ncd.data.transforms.build_transform``) for a whole uint8 batch on its device.

    ``params(keys, height, width)`` draws each image's parameters (``[B, NUM_PARAMS]``, float64)
    from ``(seed, epoch, index, view)``; ``apply(images, params)`` applies given rows;
    ``forward(images, keys)`` does both."""

    # the draws of one view: crop areas and log-ratios of the attempts, the box position, flip,
    # jitter applied, the order's keys, the four factors, grayscale
    D_AREA, D_RATIO = 0, _CROP_TRIES
    D_TOP, D_LEFT, D_FLIP, D_JITTER = 2 * _CROP_TRIES, 2 * _CROP_TRIES + 1, 2 * _CROP_TRIES + 2, 2 * _CROP_TRIES + 3
    D_ORDER = 2 * _CROP_TRIES + 4
    D_FACTORS = D_ORDER + 4
    D_GRAY = D_FACTORS + 4
    NUM_DRAWS = D_GRAY + 1

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float], *,
                 crop_scale: Sequence[float] = (0.2, 1.0), crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, seed: int = 0, view: int = 0, quantize: bool = True,
                 grayscale_first: bool = False) -> None:
        super().__init__()
        self.grayscale_first = bool(grayscale_first)  # SeLa's ImageNet recipe: RandomGrayscale before ColorJitter
        self.size = int(crop_size)
        self.scale, self.ratio = (float(crop_scale[0]), float(crop_scale[1])), (float(crop_ratio[0]), float(crop_ratio[1]))
        self.flip_p, self.jitter_p, self.grayscale_p = float(flip_p), float(jitter_p), float(grayscale_p)
        # ColorJitter's ranges (None = that operation is off), exactly as torchvision derives them
        from torchvision import transforms as T  # torchvision's import is left to the jobs that augment

        cj = T.ColorJitter(*jitter)
        self.ranges = (cj.brightness, cj.contrast, cj.saturation, cj.hue)
        self.seed, self.view, self.quantize = int(seed), int(view), bool(quantize)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    # ---------------------------------------------------------------- parameters
    def params(self, keys: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Each image's parameters from its key row ``(epoch, index)`` (``keys``: ``[B, 2]`` int64)."""
        u = uniform(key_hash(self.seed, keys[:, 0], keys[:, 1], self.view), self.NUM_DRAWS)
        b, dev = u.shape[0], u.device
        p = torch.zeros(b, NUM_PARAMS, dtype=torch.float64, device=dev)
        # RandomResizedCrop.get_params: the first of 10 attempts whose box fits, else the fallback
        area = float(height * width)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, self.D_AREA:self.D_AREA + _CROP_TRIES])
        aspect = torch.exp(lo + (hi - lo) * u[:, self.D_RATIO:self.D_RATIO + _CROP_TRIES])
        ws, hs = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
        ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
        first = torch.argmax(ok.to(torch.int8), dim=1)
        found = ok.any(dim=1)
        w = torch.gather(ws, 1, first[:, None])[:, 0]
        h = torch.gather(hs, 1, first[:, None])[:, 0]
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fw, fh = round(height * max(self.ratio)), height
        else:
            fw, fh = width, height
        w = torch.where(found, w, torch.full_like(w, fw))
        h = torch.where(found, h, torch.full_like(h, fh))
        # torch.randint(0, n) of an attempt that fits: floor(u * n); the fallback is centred
        top = torch.where(found, torch.floor(u[:, self.D_TOP] * (height - h + 1)), torch.floor((height - h) / 2))
        left = torch.where(found, torch.floor(u[:, self.D_LEFT] * (width - w + 1)), torch.floor((width - w) / 2))
        p[:, P_TOP], p[:, P_LEFT], p[:, P_H], p[:, P_W] = top, left, h, w
        p[:, P_FLIP] = (u[:, self.D_FLIP] < self.flip_p).double()
        # RandomApply applies when not p < u; ColorJitter: a random order, each factor uniform in its range
        p[:, P_JITTER] = (u[:, self.D_JITTER] <= self.jitter_p).double()
        p[:, P_ORDER] = torch.argsort(u[:, self.D_ORDER:self.D_ORDER + 4], dim=1).double()
        for k, (r, n) in enumerate(zip(self.ranges, _NEUTRAL)):
            f = u[:, self.D_FACTORS + k]
            p[:, P_FACTORS.start + k] = n if r is None else r[0] + (r[1] - r[0]) * f
        p[:, P_GRAY] = (u[:, self.D_GRAY] < self.grayscale_p).double()
        return p

    # ---------------------------------------------------------------- pixels
    def _q(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 255.0) / 255.0 if self.quantize else x

    def _q_(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`_q` in place (the same operations, so the same bits) on a tensor nothing else holds:
        on the CPU a fresh batch-sized result per step costs more than the arithmetic."""
        return x.mul_(255.0).round_().div_(255.0) if self.quantize else x

    def _resample_weights(self, start: torch.Tensor, length: torch.Tensor, full: int,
                          flip: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, S, full]``: PIL's bilinear resampling coefficients of each image's box ``[start, start +
        length)`` onto ``S`` output pixels (``ImagingResample``: output ``u`` centred at ``start + (u + ½)·l/S``,
        a triangle filter widened by the reduction factor where the box is larger than ``S``, so a
        shrinking resize is antialiased; only pixels inside the box, weights normalised to 1)."""
        s = self.size
        scale = (length / s).view(-1, 1, 1)
        support = torch.clamp(scale, min=1.0)
        u = torch.arange(s, device=start.device, dtype=start.dtype).view(1, -1, 1)
        if flip is not None:  # a flipped output reads its columns right to left: u → S − 1 − u (exact integers)
            u = u + (flip > 0.5).to(u.dtype).view(-1, 1, 1) * (s - 1 - 2 * u)
        centre = start.view(-1, 1, 1) + (u + 0.5) * scale                           # [B, S, 1]
        j = torch.arange(full, device=start.device, dtype=start.dtype).view(1, 1, -1)
        # clamp(1 − |j + ½ − centre| / support, 0), in place on the one [B, S, full] tensor
        w = (j + 0.5 - centre).abs_().div_(support).neg_().add_(1.0).clamp_(min=0.0)
        inside = (j >= start.view(-1, 1, 1)) & (j < (start + length).view(-1, 1, 1))    # [B, 1, full]
        w.mul_(inside.to(w.dtype))
        return w.div_(w.sum(dim=-1, keepdim=True))

    def resized_crop(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Every image's box resized to ``S × S`` and flipped where its flip is set: PIL's two separable
        passes (horizontal, then vertical, each rounded to the 8-bit grid as PIL stores it), as two
        batched products with per-image coefficient matrices (:meth:`_resample_weights`)."""
        _, _, hh, ww = x.shape
        # float32 coefficients: a position error of ~1e-5 pixel, far below the 8-bit grid
        p = params.to(device=x.device, dtype=torch.float32)
        wx = self._resample_weights(p[:, P_LEFT], p[:, P_W], ww, p[:, P_FLIP]).to(x.dtype)
        wy = self._resample_weights(p[:, P_TOP], p[:, P_H], hh).to(x.dtype)
        b, c, s = x.shape[0], x.shape[1], self.size
        # the horizontal pass as one product per image over all its rows ([C·H, W] @ [W, S]), which
        # needs no copy of the coefficients per channel
        x = self._q_half_up_(torch.bmm(x.reshape(b, c * hh, ww), wx.transpose(1, 2)).view(b, c, hh, s))
        return self._q_half_up_(torch.matmul(wy[:, None], x))                # [B, C, S, S]

    def _q_half_up_(self, x: torch.Tensor) -> torch.Tensor:
        # PIL's fixed-point resampling rounds halves up (torch.round rounds them to even); the small
        # offset keeps a sum that float arithmetic puts a hair under a half on PIL's side of it.
        # In place: x is a fresh product nothing else holds.
        return x.mul_(255.0).add_(0.5 + 1e-4).floor_().div_(255.0) if self.quantize else x

    def color(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Colour jitter with each image's own order and factors. In each of the four slots an image
        undergoes exactly one operation, so brightness, contrast and saturation are one per-image map
        ``clamp(a·x + b·gray(x) + c·mean(gray(x)), 0, 1)`` over the whole batch: brightness ``(f, 0,
        0)``, contrast ``(f, 0, 1 − f)``, saturation ``(f, 1 − f, 0)``, anything else ``(1, 0, 0)``.
        These are the float operations of Kornia's ``adjust_brightness_accumulative``,
        ``adjust_contrast_with_mean_subtraction`` and ``adjust_saturation_with_gray_subtraction``
        (the added zero terms are exact), so the bits are theirs, in one pass instead of three per slot;
        the images whose operation is hue then go through :func:`hue_shift`."""
        from kornia.color import rgb_to_grayscale

        p = params.to(device=x.device)
        applied = p[:, P_JITTER] > 0.5
        sel = torch.nonzero(applied).flatten()
        if not sel.numel():
            return x
        whole, full = sel.numel() == x.shape[0], x
        if not whole:  # only the images whose jitter was drawn (each image's steps are its own)
            x, p = x[sel], p[sel]
        op = p[:, P_ORDER].long()  # [B, 4]: each slot's operation
        factors = p[:, P_FACTORS].to(x.dtype)
        rgb = x.shape[1] == 3
        # saturation and hue leave a 1-channel image as it is; an operation whose range is off has its
        # neutral factor in every row already
        n_ops = 4 if rgb else 2
        hue_on = rgb and self.ranges[3] is not None
        # per image and slot: the coefficients a, b, c of the map above
        one, zero = torch.ones_like(op, dtype=x.dtype), torch.zeros_like(op, dtype=x.dtype)
        a = torch.where(op == 0, factors[:, 0:1], one)
        for k in range(1, min(n_ops, 3)):
            a = torch.where(op == k, factors[:, k:k + 1], a)
        b = torch.where(op == 2, 1 - factors[:, 2:3], zero)
        c = torch.where(op == 1, 1 - factors[:, 1:2], zero)
        # PIL shifts its 8-bit hue channel by int(f * 255) steps (truncated), which quantize mimics
        shift = torch.trunc(factors[:, 3] * 255) / 255 if self.quantize else factors[:, 3]
        for slot in range(4):
            y = x * a[:, slot].view(-1, 1, 1, 1)
            if rgb:
                gray = rgb_to_grayscale(x)
                # b·gray + c·mean on one channel, then added once: per image one of the two is an
                # exact zero, so the sum is the term Kornia adds
                mean = gray.mean((-2, -1), True)
                y.add_((b[:, slot].view(-1, 1, 1, 1) * gray).add_(mean * c[:, slot].view(-1, 1, 1, 1)))
            else:
                y.add_(x.mean((-3, -2, -1), True) * c[:, slot].view(-1, 1, 1, 1))
            y.clamp_(0.0, 1.0)
            if hue_on:
                idx = torch.nonzero(op[:, slot] == 3).flatten()
                if idx.numel():
                    y.index_put_((idx,), hue_shift(y[idx], shift[idx]))
            x = self._q_(y)
        return x if whole else full.index_put((sel,), x)

    def grayscale(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """RandomGrayscale: the luma (ITU-R 601-2, as PIL's ``convert("L")``) in all three channels."""
        if x.shape[1] != 3:
            return x  # grayscale of a 1-channel image is itself
        from kornia.color import rgb_to_grayscale

        # only the images that turn grey: on the CPU a batch-wide torch.where costs more than this
        idx = torch.nonzero(params[:, P_GRAY].to(x.device) > 0.5).flatten()
        if not idx.numel():
            return x
        return x.index_put((idx,), self._q(rgb_to_grayscale(x[idx])).expand(-1, 3, -1, -1))

    def apply(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` and ``[B, NUM_PARAMS]`` → normalised float ``[B, C, S, S]``."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise NcdError(f"batched augmentation takes a uint8 batch [B, C, H, W], got {images.dtype} "
                           f"{list(images.shape)}")
        # a channels-last batch (a permuted HWC array) made contiguous as uint8: every step below is
        # elementwise or a per-image product, and runs 1.5x slower on the strided layout
        x = images.contiguous().float().div_(255.0)
        x = self.resized_crop(x, params)
        if self.grayscale_first:
            x = self.color(self.grayscale(x, params), params)
        else:
            x = self.grayscale(self.color(x, params), params)
        # in place: every step above returned a tensor of its own (or its input, which is ours)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def forward(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The views of a uint8 batch whose images have the key rows ``(epoch, index)``."""
        return self.apply(images, self.params(keys, images.shape[-2], images.shape[-1]))


def raw_image(base: Dataset, i: int) -> tuple[torch.Tensor, int]:
    """``base[i]`` as a uint8 ``[C, H, W]`` tensor and its target: the dataset's own ``raw_image``
    where it has one (an in-memory array needs no PIL image), else ``pil_to_tensor`` of its image."""
    raw = getattr(base, "raw_image", None)
    if raw is not None:
        return raw(i)
    img, target = base[i]
    return tv_module("transforms.functional").pil_to_tensor(img), target


class RawImages(Dataset):
    """``({"image": uint8 [C, H, W], "key": [epoch, index]}, target, index)``: the decoded image as a
    tensor and its key, for :func:`apply_views` on the device. ``keyed_item`` is what
    :class:`~ncd.methods.common.SeededItems` calls, so the key is the epoch the sampler drew."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def keyed_item(self, epoch: int, i: int):
        image, target = raw_image(self.base, i)
        return {"image": image, "key": torch.tensor([epoch, i], dtype=torch.int64)}, target, i

    def __getitem__(self, i: int):
        return self.keyed_item(0, i)


class RawNeighbors(RawImages):
    """SCAN's training pairs for the batched path: ``({"image", "neighbor": uint8 [C, H, W], "key"},
    target, index)``, the neighbour drawn as :class:`~ncd.data.wrappers.NeighborsDataset` draws it (one
    of the first ``num_neighbors + 1`` columns, the sample itself included, from NumPy's generator,
    which :class:`~ncd.methods.common.SeededItems` seeds from (seed, epoch, index))."""

    def __init__(self, base: Dataset, neighbors: Any, num_neighbors: int) -> None:
        super().__init__(base)
        if neighbors.shape[0] != len(base):  # type: ignore[arg-type]
            raise NcdError(f"neighbour table has {neighbors.shape[0]} rows, expected {len(base)} (one per image)")  # type: ignore[arg-type]
        self.neighbors = np.asarray(neighbors)[:, : num_neighbors + 1]

    def keyed_item(self, epoch: int, i: int):
        item, target, i = super().keyed_item(epoch, i)
        j = int(np.random.choice(self.neighbors[i]))
        item["neighbor"] = raw_image(self.base, j)[0]
        return item, target, i


class CenterViews(torch.nn.Module):
    """SCAN's ``val``/``weak`` view (centre crop, normalise) of a uint8 batch on its device; no randomness."""

    def __init__(self, crop_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = int(crop_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def forward(self, images: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise NcdError(f"batched augmentation takes a uint8 batch [B, C, H, W], got {images.dtype} "
                           f"{list(images.shape)}")
        x = tv_module("transforms.functional").center_crop(images, [self.size, self.size]).float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def apply_views(views: Sequence[SimCLRViews], item: dict[str, torch.Tensor]) -> torch.Tensor:
    """A collated :class:`RawImages` batch → ``[B, V, C, S, S]`` (view ``v`` drawn by ``views[v]``)."""
    images, keys = item["image"], item["key"]
    if images.dtype != torch.uint8:
        raise NcdError(f"batched augmentation takes uint8 images, got {images.dtype}")
    return torch.stack([v(images, keys) for v in views], dim=1)


def make_views(views: torch.nn.Module | Sequence[torch.nn.Module], item: dict[str, torch.Tensor],
               layout: str = "stack") -> torch.Tensor | list[torch.Tensor]:
    """A collated :class:`RawImages` batch through ``views``, laid out as the PIL path's loader hands
    it over: ``stack`` → ``[B, V, C, S, S]`` (``MultiView``), ``single`` (one view) → ``[B, C, S, S]``
    (``Transformed``), ``list`` → one ``[B, C, S_v, S_v]`` per view (UNO's crops of several sizes)."""
    images = item["image"]  # each view module refuses what is not a uint8 batch
    if isinstance(views, torch.nn.Module):
        views = (views,)
    if layout == "stack":
        return apply_views(views, item)
    if layout == "list":
        return [v(images, item["key"]) for v in views]
    if layout == "single" and len(views) == 1:
        return views[0](images, item["key"])
    raise NcdError(f"view layout {layout!r} with {len(views)} views; expected 'stack', 'list' or 'single' (one view)")


class DeviceAugment:
    """LightningModule mixin of ``augment.backend: batched``: with ``self.views`` set (a tuple of view
    modules: a tuple, so they are not registered as submodules), a training batch whose first element
    is a :class:`RawImages` item is turned into its views, laid out as ``view_layout`` says
    (:func:`make_views`), once it is on the training device. Validation batches (already tensors)
    pass unchanged."""

    views: tuple[torch.nn.Module, ...] | None = None
    view_layout: str = "stack"

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.views is not None and isinstance(batch[0], dict):
            return (make_views(self.views, batch[0], self.view_layout), *batch[1:])
        return batch


def augment_backend(cfg: dict[str, Any]) -> str:
    """The stage's augmentation backend (``pil`` when unset): ``augment.backend``, or the
    ``augment.stages`` entry of the stage whose config ``cfg`` is (a :class:`ncd.config.StageConfig`;
    the workflow's slices hold the resolved backend already)."""
    aug = cfg.get("augment") or {}
    stage = getattr(cfg, "stage", None)
    return str((aug.get("stages") or {}).get(stage, aug.get("backend", "pil")))


def view_options(kind: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """``build_transform``'s options of ``kind`` with ``overrides`` (checked); the batched path does
    not resize first, so a ``resize`` is refused."""
    check_options(overrides, _DEFAULTS[kind], f"transform '{kind}'")
    o = {**_DEFAULTS[kind], **overrides}
    if o["resize"]:
        raise NcdError(f"augment.backend 'batched' does not resize first (resize: {o['resize']}); "
                       "expected resize: 0, or backend: pil")
    return o


def center_views(info: DatasetInfo, **overrides: Any) -> CenterViews:
    """The batched counterpart of ``build_transform("val", info, **overrides)``."""
    o = view_options("val", overrides)
    return CenterViews(o["crop_size"] or info.crop_size, info.mean, info.std)


def simclr_views(info: DatasetInfo, seed: int = 0, view: int = 0, **overrides: Any) -> SimCLRViews:
    """The batched counterpart of ``build_transform("simclr", info, **overrides)`` (same defaults),
    drawing from ``(seed, epoch, index, view)``."""
    o = view_options("simclr", overrides)
    return SimCLRViews(o["crop_size"] or info.crop_size, info.mean, info.std, crop_scale=o["crop_scale"],
                       flip_p=o["flip_p"], jitter=o["jitter"], jitter_p=o["jitter_p"],
                       grayscale_p=o["grayscale_p"], seed=seed, view=view)
