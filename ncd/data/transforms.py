"""SCAN's per-image PIL augmentations (METHODS.md 1.4): ``simclr``, ``strong`` ("ours":
4-of-14 random PIL ops + Cutout) and ``val``/``weak`` (centre crop). Each works on RGB and
on 1-channel "L" images."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from ncd.data.registry import DatasetInfo
from ncd.errors import NcdError
from ncd.ops.checks import check_options

# --------------------------------------------------------------------------------------------
# The 14 ops. Each takes (image, magnitude) and returns a new image of the same mode and size.


def _identity(img: Image.Image, _: float) -> Image.Image:
    return img


def _autocontrast(img: Image.Image, _: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, _: float) -> Image.Image:
    return ImageOps.equalize(img)


def _rotate(img: Image.Image, v: float) -> Image.Image:
    return img.rotate(v)


def _solarize(img: Image.Image, v: float) -> Image.Image:
    return ImageOps.solarize(img, v)


def _enhance(cls: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda img, v: cls(img).enhance(v)


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs)


def _shear_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, v, 0, 0, 1, 0))


def _shear_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, v, 1, 0))


def _translate_x(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, v * img.size[0], 0, 1, 0))  # v is a fraction of the width


def _translate_y(img: Image.Image, v: float) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, v * img.size[1]))


def _posterize(img: Image.Image, v: float) -> Image.Image:
    return ImageOps.posterize(img, int(v))


# name -> (function, low, high, random sign); low/high None: the op takes no magnitude.
Op = Callable[[Image.Image, float], Image.Image]
OPS: dict[str, tuple[Op, float | None, float | None, bool]] = {
    "Identity": (_identity, None, None, False),
    "AutoContrast": (_autocontrast, None, None, False),
    "Equalize": (_equalize, None, None, False),
    "Rotate": (_rotate, -30.0, 30.0, True),
    "Solarize": (_solarize, 0.0, 256.0, False),
    "Color": (_enhance(ImageEnhance.Color), 0.05, 0.95, False),
    "Contrast": (_enhance(ImageEnhance.Contrast), 0.05, 0.95, False),
    "Brightness": (_enhance(ImageEnhance.Brightness), 0.05, 0.95, False),
    "Sharpness": (_enhance(ImageEnhance.Sharpness), 0.05, 0.95, False),
    "ShearX": (_shear_x, -0.1, 0.1, True),
    "ShearY": (_shear_y, -0.1, 0.1, True),
    "TranslateX": (_translate_x, -0.1, 0.1, True),
    "TranslateY": (_translate_y, -0.1, 0.1, True),
    "Posterize": (_posterize, 4.0, 8.0, False),
}


def apply_op(img: Image.Image, name: str, magnitude: float = 0.0) -> Image.Image:
    """Apply op ``name`` with a given magnitude (ignored by the magnitude-free ops)."""
    if name not in OPS:
        raise NcdError(f"unknown augmentation op '{name}'; expected one of: {', '.join(OPS)}")
    return OPS[name][0](img, magnitude)


class RandAugmentOurs:
    """SCAN's "ours" augmentation: ``num_ops`` ops drawn uniformly with replacement, each with a
    magnitude uniform in its range; rotate/shear/translate flip sign with p=0.5.

    ``rng`` (anything with ``choice``/``uniform``/``random``) defaults to Python's ``random``
    module, which DataLoader workers seed; it is looked up per call so the transform pickles."""

    def __init__(self, num_ops: int = 4, ops: Sequence[str] | None = None,
                 rng: random.Random | Any | None = None) -> None:
        self.num_ops = num_ops
        self.ops = list(OPS) if ops is None else list(ops)
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise NcdError(f"unknown augmentation op(s) {', '.join(unknown)}; "
                           f"expected some of: {', '.join(OPS)}")
        self.rng = rng

    def sample_magnitude(self, name: str) -> float:
        """A magnitude for op ``name`` (0 for the magnitude-free ops)."""
        _, lo, hi, signed = OPS[name]
        if lo is None:
            return 0.0
        rng = self.rng or random
        v = rng.uniform(lo, hi)
        if signed and rng.random() < 0.5:
            v = -v
        return v

    def __call__(self, img: Image.Image) -> Image.Image:
        for _ in range(self.num_ops):
            name = (self.rng or random).choice(self.ops)
            img = apply_op(img, name, self.sample_magnitude(name))
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops})"


class Cutout:
    """Zero one square hole in a ``[C, H, W]`` tensor: side uniform in {1..length}, centre
    uniform over the image, clipped at the border. Applied after normalisation, so 0 is the
    dataset's mean colour. ``length`` 0 disables it."""

    def __init__(self, length: int, rng: random.Random | Any | None = None) -> None:
        if length < 0:
            raise NcdError(f"cutout length must be >= 0, got {length}")
        self.length = length
        self.rng = rng  # None: Python's random module, looked up per call (picklable)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.length == 0:
            return img
        h, w = img.shape[-2:]
        rng = self.rng or random
        side = rng.randint(1, self.length)
        cy, cx = rng.randrange(h), rng.randrange(w)
        y0, x0 = cy - side // 2, cx - side // 2
        out = img.clone()
        out[..., max(0, y0):min(h, y0 + side), max(0, x0):min(w, x0 + side)] = 0
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(length={self.length})"


class GaussianBlur:
    """PIL Gaussian blur with radius σ ~ U(lo, hi) from Python's ``random``, drawn per image (MoCo v2's
    ``GaussianBlur``, used by UNO's ImageNet and CLD's ``mocov2`` augmentations)."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


# --------------------------------------------------------------------------------------------

_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {"resize": 0, "crop_size": None, "crop_scale": (0.2, 1.0), "flip_p": 0.5,
               "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8, "grayscale_p": 0.2},
    "strong": {"resize": 0, "crop_size": None, "flip_p": 0.5, "num_ops": 4, "cutout": None},
    "val": {"resize": 0, "crop_size": None},
}
class CenterCropNormalize:
    """``T.Compose([T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])`` for an ``L`` or ``RGB``
    image no smaller than the crop, with the same operations in the same order (equal bit for bit;
    tested), without importing torchvision: every evaluation pass of an in-memory dataset (an
    ``evaluate`` job on digits) uses it, and torchvision's import costs more than the rest of such a job.
    Another mode or a smaller image goes through torchvision's ops."""

    def __init__(self, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mean, self.std = list(mean), list(std)

    def _torchvision(self) -> Callable[[Image.Image], torch.Tensor]:
        from torchvision import transforms as T

        return T.Compose([T.CenterCrop(self.size), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        ch, cw = self.size
        w, h = img.size
        if img.mode not in ("L", "RGB") or h < ch or w < cw:
            return self._torchvision()(img)
        # torchvision's center_crop offsets, crop, to_tensor (uint8 → default float / 255), normalize
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        if (ch, cw) != (h, w):
            img = img.crop((left, top, left + cw, top + ch))
        a = torch.from_numpy(np.array(img, np.uint8, copy=True))
        x = a.view(ch, cw, len(img.getbands())).permute((2, 0, 1)).contiguous()
        x = x.to(dtype=torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std})"


def eval_transform(crop_size: int, mean: Sequence[float], std: Sequence[float],
                   resize: int = 0) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform: ``[Resize(resize)] → CenterCrop(crop_size) → ToTensor → Normalize``;
    without a resize, :class:`CenterCropNormalize` (no torchvision import)."""
    if not resize:
        return CenterCropNormalize(crop_size, mean, std)
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize), T.CenterCrop(crop_size), T.ToTensor(), T.Normalize(mean, std)])


_ALIASES = {"weak": "val"}


def build_transform(kind: str, info: DatasetInfo,
                    **overrides: Any) -> Callable[[Image.Image], torch.Tensor]:
    """SCAN's ``simclr``, ``strong`` or ``val``/``weak`` transform for ``info``'s images.

    Overrides (keyword) replace the paper defaults; ``crop_size`` and ``cutout`` default to
    the dataset's. ``resize`` (0 = off, the papers' setting) first resizes the short side, for
    tiny images whose crops would otherwise be too coarse (the crop size then defaults to it)."""
    base = _ALIASES.get(kind, kind)
    if base not in _DEFAULTS:
        raise NcdError(f"unknown transform kind '{kind}'; expected one of: "
                       + ", ".join([*_DEFAULTS, *_ALIASES]))
    check_options(overrides, _DEFAULTS[base], f"transform '{kind}'")
    o = {**_DEFAULTS[base], **overrides}
    o["crop_size"] = o["crop_size"] or o["resize"] or info.crop_size
    if base == "val":
        return eval_transform(o["crop_size"], info.mean, info.std, resize=o["resize"])
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    resize = [T.Resize(o["resize"])] if o["resize"] else []
    if base == "simclr":
        return T.Compose([
            *resize,
            T.RandomResizedCrop(o["crop_size"], scale=tuple(o["crop_scale"])),
            T.RandomHorizontalFlip(o["flip_p"]),
            T.RandomApply([T.ColorJitter(*o["jitter"])], p=o["jitter_p"]),
            T.RandomGrayscale(o["grayscale_p"]),  # keeps the input's channel count (L stays L)
            *normalize,
        ])
    cutout = info.cutout if o["cutout"] is None else o["cutout"]
    return T.Compose([
        *resize,
        T.RandomHorizontalFlip(o["flip_p"]),
        T.RandomCrop(o["crop_size"]),  # no padding: SCAN's, a no-op at CIFAR/STL size
        RandAugmentOurs(o["num_ops"]),
        *normalize,
        *([Cutout(cutout)] if cutout else []),
    ])
