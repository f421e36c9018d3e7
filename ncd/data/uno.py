"""UNO's data pieces (METHODS.md 3.4, 3.7): the named known/novel class splits, target
remapping (known → 0…K-1, novel → K…K+N-1) and the large/small/eval crop augmentations."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ncd.data.registry import DatasetInfo
from ncd.data.transforms import GaussianBlur, eval_transform
from ncd.errors import NcdError
from ncd.ops.checks import check_options

# --------------------------------------------------------------------------------------------
# Class splits (METHODS.md 3.7)

UNO_SPLITS: dict[str, dict] = {
    "cifar10-5/5": {"dataset": "cifar10", "known": list(range(5)), "novel": list(range(5, 10))},
    "cifar100-80/20": {"dataset": "cifar100", "known": list(range(80)),
                       "novel": list(range(80, 100))},
    "cifar100-50/50": {"dataset": "cifar100", "known": list(range(50)),
                       "novel": list(range(50, 100))},
    "digits-5/5": {"dataset": "digits", "known": list(range(5)), "novel": list(range(5, 10))},
    **{f"imagenet-{s}": {"dataset": "imagenet", "excluded": "imagenet_uno_excluded118.txt",
                         "novel": f"imagenet_uno_{s}.txt"} for s in "ABC"},
}


@lru_cache(maxsize=None)
def _read_wnids(fname: str) -> tuple[str, ...]:
    text = resources.files("ncd.data").joinpath(f"splits/{fname}").read_text()
    return tuple(sorted(line.split()[0] for line in text.splitlines() if line.strip()))


def _spec(name: str) -> dict:
    if name not in UNO_SPLITS:
        raise NcdError(f"unknown UNO split '{name}'; expected one of: {', '.join(UNO_SPLITS)}")
    return UNO_SPLITS[name]


def _imagenet_name(split: str) -> str:
    name = split if split.startswith("imagenet-") else f"imagenet-{split}"
    if name not in UNO_SPLITS or not name.startswith("imagenet-"):
        raise NcdError(f"unknown UNO ImageNet split '{split}'; expected one of: A, B, C")
    return name


def uno_imagenet_wnids(split: str) -> tuple[list[str], list[str]]:
    """(the 118 excluded wnids, the split's 30 novel wnids), both sorted; ``split`` is
    ``A``/``B``/``C`` or ``imagenet-A`` etc. The 882 known wnids are all ImageNet's minus the 118."""
    spec = UNO_SPLITS[_imagenet_name(split)]
    return list(_read_wnids(spec["excluded"])), list(_read_wnids(spec["novel"]))


def uno_imagenet_split_ids(split: str, all_wnids: list[str]) -> tuple[list[int], list[int]]:
    """(known ids, novel ids) as indices into ``all_wnids`` (the sorted 1000 ImageNet wnids,
    i.e. torchvision's class index): known = the 882 not excluded, novel = the split's 30."""
    excluded, novel = uno_imagenet_wnids(split)
    wnids = list(all_wnids)
    if len(wnids) != 1000 or len(set(wnids)) != 1000 or wnids != sorted(wnids):
        raise NcdError("all_wnids must be the 1000 unique ImageNet wnids in sorted order, got "
                       f"{len(wnids)} entries ({len(set(wnids))} unique, "
                       f"{'sorted' if wnids == sorted(wnids) else 'unsorted'})")
    missing = sorted(set(excluded) - set(wnids))
    if missing:
        raise NcdError(f"all_wnids lacks {len(missing)} UNO wnid(s): {', '.join(missing[:5])}"
                       + (" …" if len(missing) > 5 else ""))
    index = {w: i for i, w in enumerate(wnids)}
    excl = set(excluded)
    return [i for i, w in enumerate(wnids) if w not in excl], [index[w] for w in novel]


def uno_split(name: str, all_wnids: list[str] | None = None) -> tuple[str, list[int], list[int]]:
    """(dataset, known class ids, novel class ids) in the dataset's own label space. ImageNet
    splits need ``all_wnids`` (the sorted 1000 wnids, e.g. read from the ImageNet root)."""
    spec = _spec(name)
    if "excluded" in spec:
        if all_wnids is None:
            raise NcdError(f"UNO split '{name}' needs all_wnids, the sorted 1000 ImageNet wnids")
        return (spec["dataset"], *uno_imagenet_split_ids(name, all_wnids))
    return spec["dataset"], list(spec["known"]), list(spec["novel"])


def remap_targets(targets: np.ndarray, known: list[int],
                  novel: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(new_targets, keep_mask): known[i] → i, novel[j] → len(known)+j; other classes are
    dropped (keep False, new target -1)."""
    order = [*known, *novel]
    if len(set(order)) != len(order):
        raise NcdError("known and novel class ids must be unique and disjoint")
    targets = np.asarray(targets, dtype=np.int64)
    lut = {c: i for i, c in enumerate(order)}
    new = np.array([lut.get(int(t), -1) for t in targets.ravel()], dtype=np.int64)
    new = new.reshape(targets.shape)
    return new, new >= 0


# --------------------------------------------------------------------------------------------
# Augmentations (METHODS.md 3.4)

# UNO's own CIFAR normalisation; other datasets use their DatasetInfo's.
UNO_NORM = {"cifar10": ((0.491, 0.482, 0.447), (0.202, 0.199, 0.201)),
            "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276))}


class Solarize:
    """PIL solarize with a threshold drawn uniformly from [0, 256) per call."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, random.uniform(0, 256))

    def __repr__(self) -> str:
        return "Solarize(threshold~U[0,256))"


class Equalize:
    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.equalize(img)

    def __repr__(self) -> str:
        return "Equalize()"


_OVERRIDES = ("size", "small_size", "flip_p", "jitter_p", "solarize_p", "equalize_p", "padding")
_KINDS = ("large", "small", "eval")


def _imagenet_like(info: DatasetInfo) -> bool:
    return info.crop_size >= 96 or info.name.startswith("imagenet")


def _options(kind: str, info: DatasetInfo, overrides: dict[str, Any]) -> dict[str, Any]:
    if kind not in _KINDS:
        raise NcdError(f"unknown UNO transform kind '{kind}'; expected one of: {', '.join(_KINDS)}")
    check_options(overrides, _OVERRIDES, f"UNO transform '{kind}'")
    inet = _imagenet_like(info)
    size = overrides.get("size", info.crop_size)
    small_p = kind == "small"
    o = {"size": size,
         "small_size": round(size * 96 / 224) if inet else round(size * 18 / 32),
         "flip_p": 0.5,
         "jitter_p": (0.8 if small_p else 0.5) if inet else (0.8 if small_p else 0.6),
         "solarize_p": 0.2 if small_p else 0.1, "equalize_p": 0.2 if small_p else 0.1,
         "padding": size // 8, **overrides}
    for k in ("size", "small_size"):
        if isinstance(o[k], bool) or not isinstance(o[k], int) or o[k] < 1:
            raise NcdError(f"{k} must be a positive integer, got {o[k]!r}")
    if isinstance(o["padding"], bool) or not isinstance(o["padding"], int) or o["padding"] < 0:
        raise NcdError(f"padding must be a non-negative integer, got {o['padding']!r}")
    for k in ("flip_p", "jitter_p", "solarize_p", "equalize_p"):
        if isinstance(o[k], bool) or not isinstance(o[k], (int, float)) or not 0 <= o[k] <= 1:
            raise NcdError(f"{k} must be a probability in [0, 1], got {o[k]!r}")
    return o


def build_uno_transform(kind: str, info: DatasetInfo,
                        **overrides: Any) -> Callable[[Image.Image], torch.Tensor]:
    """UNO's ``large`` (2 per image), ``small`` (multicrop) or ``eval`` transform for ``info``.

    ImageNet-like datasets (crop size >= 96 or name imagenet*) get UNO's ImageNet pipeline
    (large ``size`` = crop size, small = size·96/224, eval Resize size·256/224 → CenterCrop);
    others the CIFAR one (small = size·18/32, padding size//8). Works on 1-channel "L" images."""
    o = _options(kind, info, overrides)
    mean, std = UNO_NORM.get(info.name, (info.mean, info.std))
    size, inet = o["size"], _imagenet_like(info)
    if kind == "eval":
        return eval_transform(size, mean, std, resize=round(size * 256 / 224) if inet else 0)
    from torchvision import transforms as T  # here: an evaluate job needs only the eval transform

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=o["jitter_p"])
    flip = T.RandomHorizontalFlip(o["flip_p"])
    if inet:
        crop = (T.RandomResizedCrop(size, scale=(0.5, 1.0)) if kind == "large"
                else T.RandomResizedCrop(o["small_size"], scale=(0.08, 0.5)))
        blur_p = 0.2 if kind == "large" else 0.5
        return T.Compose([crop, flip, jitter, T.RandomGrayscale(0.2),  # keeps L as L
                          T.RandomApply([GaussianBlur()], p=blur_p), *norm])
    crop = (T.RandomChoice([T.RandomCrop(size, padding=o["padding"]),
                            T.RandomResizedCrop(size, scale=(0.5, 1.0))]) if kind == "large"
            else T.RandomResizedCrop(o["small_size"], scale=(0.3, 0.8)))
    return T.Compose([crop, flip, jitter, T.RandomApply([Solarize()], p=o["solarize_p"]),
                      T.RandomApply([Equalize()], p=o["equalize_p"]), *norm])
