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
from ncd.data.transforms import Cutout, RandAugmentOurs, build_transform  # torchvision only once one is built


__all__ = [
    "CIFAR100_TO_20", "CIFAR20_SUPERCLASSES", "DATASETS", "Cutout", "DatasetInfo",
    "RandAugmentOurs", "build_dataset", "build_transform", "dataset_ready", "get_info",
    "imagenet_subset_classes", "prepare_dataset",
]
