"""Datasets (registry, downloads, class splits) and SCAN's augmentations."""

from ncd.data.datasets import CIFAR100_TO_20, CIFAR20_SUPERCLASSES, imagenet_subset_classes
from ncd.data.registry import (
    DATASETS,
    DatasetInfo,
    build_dataset,
    dataset_ready,
    get_info,
    prepare_dataset,
)

# the transforms are torchvision's: imported when first asked for, so that a job which reads an in-memory
# dataset without them (an evaluate job on digits) does not pay torchvision's import
_TRANSFORMS = frozenset({"Cutout", "RandAugmentOurs", "build_transform"})


def __getattr__(name: str):
    if name in _TRANSFORMS:
        from ncd.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CIFAR100_TO_20", "CIFAR20_SUPERCLASSES", "DATASETS", "Cutout", "DatasetInfo",
    "RandAugmentOurs", "build_dataset", "build_transform", "dataset_ready", "get_info",
    "imagenet_subset_classes", "prepare_dataset",
]
