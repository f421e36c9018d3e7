"""The dataset registry: what each dataset is (:class:`DatasetInfo`), how to get its files
(:func:`prepare_dataset`, which writes ``root/READY``) and how to read a split
(:func:`build_dataset`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ncd.data import datasets as D
from ncd.data.folder import check_imagefolder
from ncd.errors import NcdError
from ncd.ops.checks import check_options
from ncd.utils import write_text_atomic

READY = "READY"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; the augmentation sizes are SCAN's (METHODS.md 1.4)."""

    name: str
    num_classes: int
    channels: int            # 3, or 1 for digits
    image_size: int          # side length of the images as the dataset yields them
    crop_size: int           # SCAN crop size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: tuple[str, ...]  # valid split names
    train_split: str         # split used for clustering training
    pretrain_split: str      # split for pretext training
    test_split: str          # split for evaluation
    cutout: int              # SCAN Cutout length
    downloadable: bool       # False where the user must supply the files


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR20_MEAN, CIFAR20_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
# Pixel mean/std of the digits train split in [0, 1] units (tests recompute them).
DIGITS_MEAN, DIGITS_STD = (0.30560,), (0.37596,)
# ImageNet's Cutout/crop ratio (75 / 224), used for imagefolder at other sizes.
_IMAGENET_CUTOUT_RATIO = 75 / 224

_TT = ("train", "test")
# Fetched through torchvision's downloaders (md5-checked archives and files).
_TORCHVISION = ("cifar10", "cifar100", "cifar100-20", "stl10")


def _cifar(name: str, k: int, mean: tuple, std: tuple) -> DatasetInfo:
    return DatasetInfo(name, k, 3, 32, 32, mean, std, _TT, "train", "train", "test", 16, True)


def _imagenet(name: str, k: int) -> DatasetInfo:
    return DatasetInfo(name, k, 3, 256, 224, IMAGENET_MEAN, IMAGENET_STD, ("train", "val"),
                       "train", "train", "val", 75, False)


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, 8, DIGITS_MEAN, DIGITS_STD, _TT,
                          "train", "train", "test", 3, True),
    "cifar10": _cifar("cifar10", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": _cifar("cifar100", 100, CIFAR20_MEAN, CIFAR20_STD),
    "cifar100-20": _cifar("cifar100-20", 20, CIFAR20_MEAN, CIFAR20_STD),
    "stl10": DatasetInfo("stl10", 10, 3, 96, 96, IMAGENET_MEAN, IMAGENET_STD,
                         ("train", "test", "unlabeled", "train+unlabeled", "train+test"),
                         "train", "train+unlabeled", "test", 32, True),
    "imagenet": _imagenet("imagenet", 1000),
    "imagenet-50": _imagenet("imagenet-50", 50),
    "imagenet-100": _imagenet("imagenet-100", 100),
    "imagenet-200": _imagenet("imagenet-200", 200),
    "imagefolder": DatasetInfo("imagefolder", 0, 3, 224, 224, IMAGENET_MEAN, IMAGENET_STD, _TT,
                               "train", "train", "test", 75, False),
}

# Keyword options each dataset accepts, with defaults.
_OPTIONS: dict[str, dict[str, Any]] = {"imagefolder": {"image_size": 224}}


def _check_name(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise NcdError(f"unknown dataset '{name}'; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def _options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS.get(name, {})
    check_options(options, allowed, f"dataset '{name}'")
    opts = {**allowed, **options}
    if "image_size" in opts and (not isinstance(opts["image_size"], int) or opts["image_size"] < 1):
        raise NcdError(f"image_size must be a positive integer, got {opts['image_size']!r}")
    return opts


def _subset_size(name: str) -> int | None:
    return int(name.split("-")[1]) if name.startswith("imagenet-") else None


def get_info(name: str, root: str | os.PathLike | None = None, **options: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``. For ``imagefolder``, ``root`` (to count the class
    folders) and the ``image_size`` option fill in what depends on the user's data."""
    info = _check_name(name)
    opts = _options(name, options)
    if name == "imagefolder":
        size = opts["image_size"]
        k = len(D.imagefolder_classes(root)) if root is not None else 0
        info = dataclasses.replace(info, num_classes=k, image_size=size, crop_size=size,
                                   cutout=max(1, round(size * _IMAGENET_CUTOUT_RATIO)))
    return info


def _check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.splits:
        raise NcdError(f"unknown split '{split}' for dataset '{info.name}'; expected one of: "
                       + ", ".join(info.splits))


def _fetch(name: str, root: Path, download: bool, opts: dict[str, Any]) -> list[str]:
    """Make sure the files are there and intact; return lines describing them."""
    if name == "digits":
        cache = D.write_digits_cache(root / D.DIGITS_CACHE)
        n = sum(len(D.load_digits_split(s, cache=cache)) for s in ("train", "test"))
        return [f"sklearn.datasets.load_digits ({n} images), split arrays cached in {cache.name}"]
    if name in _TORCHVISION:
        return [f"{rel}  md5 {md5}" for rel, md5 in D.download_torchvision(name, root, download)]
    info = DATASETS[name]
    if name == "imagefolder":
        return check_imagefolder(root)
    if name.startswith("imagenet"):
        need = D.imagenet_requirements(root, info.splits)
        if need:
            raise D.imagenet_missing_error(name, root, need)
    lines = []
    for split in info.splits:
        ds = _load(name, root, split, None, opts)
        lines.append(f"{split}: {len(ds)} images, {len(ds.classes)} classes")
    return lines


def _load(name: str, root: Path, split: str, transform: Callable | None,
          opts: dict[str, Any]) -> torch.utils.data.Dataset:
    if name == "digits":
        return D.load_digits_split(split, transform, cache=root / D.DIGITS_CACHE)
    if name.startswith("cifar"):
        return D.load_cifar(name, root, split, transform)
    if name == "stl10":
        return D.load_stl10(root, split, transform)
    if name.startswith("imagenet"):
        return D.load_imagenet(root, split, transform, subset=_subset_size(name))
    return D.load_imagefolder(root, split, transform, **opts)


def build_dataset(name: str, root: str | os.PathLike, split: str, transform: Callable | None = None,
                  download: bool = False, **options: Any) -> torch.utils.data.Dataset:
    """One split of a dataset: items ``(PIL image or transform(image), int target)``, with
    ``targets`` (int64 array) and ``classes``. With ``download`` missing files are fetched
    first (no READY marker is written; that is :func:`prepare_dataset`'s job)."""
    info = _check_name(name)
    _check_split(info, split)
    opts = _options(name, options)
    root = Path(root)
    if download and name in _TORCHVISION and not dataset_ready(name, root):
        D.download_torchvision(name, root, download=True)
    return _load(name, root, split, transform, opts)


def prepare_dataset(name: str, root: str | os.PathLike, download: bool = True, *,
                    marker: str | os.PathLike | None = None, **options: Any) -> Path:
    """Download (where possible) and verify ``name`` in ``root``, then write ``root/READY`` (or
    ``marker``: a user's own folder, ``data_path``, is only read, its marker lives under data_dir).

    Returns the marker's path. Raises :class:`NcdError` (and writes no marker) when files are
    missing and cannot be downloaded, or a present file fails its checksum; for ``imagefolder``
    also when the folder is missing or empty or an image does not decode (naming it)."""
    _check_name(name)
    opts = _options(name, options)
    root = Path(root)
    lines = _fetch(name, root, download, opts)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = (f"dataset: {name}\nroot: {root.resolve()}\ndate: {stamp}\nfiles:\n"
            + "".join(f"  {line}\n" for line in lines))
    marker = Path(marker) if marker is not None else root / READY
    write_text_atomic(marker, text)
    return marker


def dataset_ready(name: str, root: str | os.PathLike) -> bool:
    """Whether :func:`prepare_dataset` has completed for ``root`` (its READY marker exists)."""
    _check_name(name)
    return (Path(root) / READY).is_file()
