"""CLD's augmentations (METHODS.md 5.6) and its multi-view / jigsaw training items.

Kinds of :func:`build_cld_transform`:

* ``npid`` - the CIFAR default of the NPID scripts (and MoCo CIFAR-100): RandomResizedCrop(scale
  (0.2, 1)) → ColorJitter(0.4, 0.4, 0.4, 0.4) applied always → RandomGrayscale(0.2) → flip.
* ``mocov2`` - MoCo v2's augmentation (``--aug-plus`` on CIFAR-10, MoCo v2 on ImageNet): RRC(0.2, 1)
  → ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 → RandomGrayscale(0.2) → PIL Gaussian blur
  σ ~ U(0.1, 2) with p 0.5 → flip; ``erasing`` appends RandomErasing(p = 1) after normalising.
* ``infomin`` - InfoMin's augmentation "D": RRC(0.2, 1) → flip → ColorJitter(0.8, 0.8, 0.8, 0.2)
  with p 0.8 → Gaussian blur (kernel 23, σ ~ U(0.1, 2)) with p 0.5 → RandAugment
  "rand-n2-m10-mstd0.5" (timm) → RandomGrayscale(0.2).
* ``test`` - ToTensor + Normalize (CIFAR, digits); Resize + CenterCrop first where the dataset's
  images are larger than its crop (ImageNet: 256 → 224).
* ``linear`` / ``linear_ra`` - the ImageNet linear probe's train augmentation: RRC(224) + flip
  (MoCo's ``main_lincls``), with RandAugment for InfoMin's probe.

Every kind ends with ToTensor and the normalisation of :func:`cld_normalization`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ncd.data.batched import SimCLRViews
from ncd.data.registry import CIFAR10_MEAN, CIFAR10_STD, DatasetInfo
from ncd.data.transforms import GaussianBlur, eval_transform
from ncd.data.wrappers import MultiView
from ncd.errors import NcdError
from ncd.ops.checks import check_options

KINDS = ("npid", "mocov2", "infomin", "test", "linear", "linear_ra")

_DEFAULTS: dict[str, Any] = {"crop_size": None, "crop_scale": (0.2, 1.0), "jitter": None, "jitter_p": None,
                             "grayscale_p": 0.2, "flip_p": 0.5, "blur_p": None, "erasing": False}


def cld_normalization(info: DatasetInfo) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLD normalises CIFAR-100 with the CIFAR-10 constants (its dataloader has one set); every
    other dataset with its own."""
    if info.name.startswith("cifar"):
        return CIFAR10_MEAN, CIFAR10_STD
    return info.mean, info.std


#: MoCo v2's PIL blur, σ ~ U(0.1, 2) per image (the one in :mod:`ncd.data.transforms`, under CLD's old name).
PILGaussianBlur = GaussianBlur


def _rand_augment(crop: int) -> Callable:
    from timm.data.auto_augment import rand_augment_transform  # loaded lazily: timm is a heavy import

    mean = (0.485, 0.456, 0.406)
    return rand_augment_transform("rand-n2-m10-mstd0.5", {"translate_const": int(crop * 0.45),
                                                         "img_mean": tuple(min(255, round(255 * m)) for m in mean)})


def build_cld_transform(kind: str, info: DatasetInfo, **overrides: Any) -> Callable[[Image.Image], torch.Tensor]:
    """CLD's transform ``kind`` (see the module docstring) for ``info``'s images.

    Overrides: ``crop_size`` (default: the dataset's), ``crop_scale``, ``jitter`` (4 numbers),
    ``jitter_p``, ``grayscale_p``, ``flip_p``, ``blur_p``, ``erasing``; None keeps the kind's value.
    """
    if kind not in KINDS:
        raise NcdError(f"unknown CLD augmentation {kind!r}; expected one of {', '.join(KINDS)}")
    check_options(overrides, _DEFAULTS, f"CLD augmentation {kind!r}")
    o = {**_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    crop = int(o["crop_size"] or info.crop_size)
    mean, std = cld_normalization(info)
    if kind == "test":
        # without a resize: CenterCropNormalize, no torchvision import for an evaluate job
        return eval_transform(crop, mean, std, resize=info.image_size if info.image_size > crop else 0)
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(mean, std)]
    # MoCo's linear probe keeps torchvision's default scale (0.08, 1); every other kind uses (0.2, 1)
    scale = (0.08, 1.0) if kind == "linear" and overrides.get("crop_scale") is None else tuple(o["crop_scale"])
    rrc = T.RandomResizedCrop(crop, scale=scale)
    flip = _apply(T.RandomHorizontalFlip(1.0), o["flip_p"])
    gray = _apply(T.RandomGrayscale(1.0), o["grayscale_p"])
    if kind in ("linear", "linear_ra"):
        steps = [rrc, flip, _rand_augment(crop) if kind == "linear_ra" else None]
    elif kind == "npid":
        jitter = T.ColorJitter(*(o["jitter"] or (0.4, 0.4, 0.4, 0.4)))
        steps = [rrc, _apply(jitter, 1.0 if o["jitter_p"] is None else o["jitter_p"]), gray, flip]
    elif kind == "mocov2":
        jitter = T.ColorJitter(*(o["jitter"] or (0.4, 0.4, 0.4, 0.1)))
        steps = [rrc, _apply(jitter, 0.8 if o["jitter_p"] is None else o["jitter_p"]), gray,
                 _apply(GaussianBlur(), 0.5 if o["blur_p"] is None else o["blur_p"]), flip]
    else:  # infomin "D"; torchvision's blur pads by reflection like InfoMin's separable kernel
        jitter = T.ColorJitter(*(o["jitter"] or (0.8, 0.8, 0.8, 0.2)))
        steps = [rrc, flip, _apply(jitter, 0.8 if o["jitter_p"] is None else o["jitter_p"]),
                 _apply(T.GaussianBlur(23, sigma=(0.1, 2.0)), 0.5 if o["blur_p"] is None else o["blur_p"]),
                 _rand_augment(crop), gray]
    steps += tail
    if kind == "mocov2" and o["erasing"]:
        steps.append(T.RandomErasing(p=1.0))
    return T.Compose([t for t in steps if t is not None])


def build_cld_views(kind: str, info: DatasetInfo, seed: int = 0, view: int = 0, **overrides: Any) -> SimCLRViews:
    """The batched counterpart (``augment.backend: batched``, :mod:`ncd.data.batched`) of
    ``build_cld_transform(kind, info, **overrides)``, drawing from ``(seed, epoch, index, view)``:
    ``npid``, and ``mocov2`` without its blur and erasing (``blur_p: 0``); the other kinds have no
    batched path. The flip comes first there and last here: it commutes with the colour operations."""
    check_options(overrides, _DEFAULTS, f"CLD augmentation {kind!r}")
    o = {**_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    if kind not in ("npid", "mocov2"):
        raise NcdError(f"CLD augmentation {kind!r} has no batched path; expected 'npid' or 'mocov2' with "
                       "augment.backend: batched, or backend: pil")
    if kind == "mocov2" and (o["blur_p"] is None or o["blur_p"] > 0 or o["erasing"]):
        raise NcdError(f"CLD augmentation 'mocov2' with blur_p {o['blur_p']} / erasing {o['erasing']} has no "
                       "batched path (no Gaussian blur or random erasing there); expected blur_p: 0 and "
                       "erasing: false, or augment.backend: pil")
    jitter = o["jitter"] or ((0.4, 0.4, 0.4, 0.4) if kind == "npid" else (0.4, 0.4, 0.4, 0.1))
    jitter_p = o["jitter_p"] if o["jitter_p"] is not None else (1.0 if kind == "npid" else 0.8)
    mean, std = cld_normalization(info)
    return SimCLRViews(int(o["crop_size"] or info.crop_size), mean, std, crop_scale=tuple(o["crop_scale"]),
                       flip_p=o["flip_p"], jitter=jitter, jitter_p=jitter_p, grayscale_p=o["grayscale_p"],
                       seed=seed, view=view)


def _apply(step: Callable, p: float) -> Callable | None:
    """``step`` with probability ``p``: left out at 0 and applied always at 1, so that a disabled
    step costs no random draw (8×8 digits spend most of their time in such draws)."""
    if p <= 0:
        return None
    from torchvision import transforms as T

    return step if p >= 1 else T.RandomApply([step], p=p)


class JigsawCrop:
    """InfoMin's jigsaw crops: a ``n_grid × n_grid`` grid over a ``img_size`` square image, one
    ``crop_size`` patch at a random offset inside every cell, row by row."""

    def __init__(self, n_grid: int = 3, img_size: int = 255, crop_size: int = 64) -> None:
        self.n_grid, self.img_size, self.crop_size = n_grid, img_size, crop_size
        self.cell = img_size // n_grid
        if self.cell < crop_size:
            raise NcdError(f"jigsaw cells of {self.cell} px cannot hold {crop_size} px patches")

    def __call__(self, img: Image.Image) -> list[Image.Image]:
        a = np.asarray(img, np.uint8)
        slack = self.cell - self.crop_size
        out = []
        for r in range(self.n_grid):
            for c in range(self.n_grid):
                dy, dx = np.random.randint(0, slack + 1, 2)
                y, x = r * self.cell + dy, c * self.cell + dx
                out.append(Image.fromarray(a[y:y + self.crop_size, x:x + self.crop_size]))
        return out


def build_jigsaw_transform(info: DatasetInfo) -> Callable[[Image.Image], torch.Tensor]:
    """InfoMin's jigsaw input: RRC(255, scale (0.6, 1)) → flip → 9 patches of 64 px, each
    ToTensor + Normalize → ``[9, C, 64, 64]``."""
    return _Jigsaw(info)


class _Jigsaw:
    def __init__(self, info: DatasetInfo) -> None:
        mean, std = cld_normalization(info)
        from torchvision import transforms as T

        self.per_patch = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        self.crops = T.Compose([T.RandomResizedCrop(255, scale=(0.6, 1.0)), T.RandomHorizontalFlip(), JigsawCrop()])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([self.per_patch(p) for p in self.crops(img)])


class CLDViews(MultiView):
    """``(views [V, C, H, W], target, index)`` with one independent draw per transform (a
    :class:`~ncd.data.wrappers.MultiView`), or ``((views, patches [9, C, h, w]), target, index)`` with
    a jigsaw transform (drawn after the views, from the same image)."""

    def __init__(self, base: Dataset, transforms: Sequence[Callable], jigsaw: Callable | None = None) -> None:
        super().__init__(base, transforms)
        self.jigsaw = jigsaw

    def __getitem__(self, i: int):
        if self.jigsaw is None:
            return super().__getitem__(i)
        img, target = self.base[i]
        return (self.views(img), self.jigsaw(img)), target, i


__all__ = ["KINDS", "CLDViews", "JigsawCrop", "PILGaussianBlur", "build_cld_transform", "build_cld_views", "build_jigsaw_transform",
           "cld_normalization"]
