"""UNO's class splits, target remapping and large/small/eval augmentations."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ncd.data import get_info
from ncd.data.uno import (UNO_SPLITS, build_uno_transform, remap_targets, uno_imagenet_split_ids,
                          uno_imagenet_wnids, uno_split)
from ncd.errors import NcdError

SIZES = {"cifar10-5/5": ("cifar10", 5, 5), "cifar100-80/20": ("cifar100", 80, 20),
         "cifar100-50/50": ("cifar100", 50, 50), "digits-5/5": ("digits", 5, 5)}


def _all_wnids(extra: int = 0) -> list[str]:
    excluded, _ = uno_imagenet_wnids("A")
    return sorted([*excluded, *(f"n9{i:07d}" for i in range(1000 - len(excluded) + extra))])


@pytest.mark.parametrize("name", list(SIZES))
def test_class_id_splits(name):
    ds, nk, nn = SIZES[name]
    dataset, known, novel = uno_split(name)
    assert (dataset, len(known), len(novel)) == (ds, nk, nn)
    assert not set(known) & set(novel) and sorted(known + novel) == list(range(nk + nn))


def test_split_names():
    assert set(UNO_SPLITS) == {*SIZES, "imagenet-A", "imagenet-B", "imagenet-C"}
    with pytest.raises(NcdError, match="cifar10-5/5"):
        uno_split("cifar10-4/6")
    with pytest.raises(NcdError, match="all_wnids"):
        uno_split("imagenet-A")
    with pytest.raises(NcdError):
        uno_imagenet_wnids("D")


def test_imagenet_splits():
    wnids = _all_wnids()
    excluded, _ = uno_imagenet_wnids("A")
    assert len(excluded) == len(set(excluded)) == 118
    novel_sets = {}
    for s in "ABC":
        dataset, known, novel = uno_split(f"imagenet-{s}", wnids)
        assert (dataset, len(known), len(novel)) == ("imagenet", 882, 30)
        assert (known, novel) == uno_imagenet_split_ids(s, wnids)
        assert known == sorted(known) and novel == sorted(novel) and not set(known) & set(novel)
        assert all(not wnids[i].startswith("n9") for i in novel)  # novel ⊂ the 118
        assert {wnids[i] for i in known} == set(wnids) - set(excluded)
        novel_sets[s] = set(novel)
    for a, b in itertools.combinations("ABC", 2):
        assert len(novel_sets[a] & novel_sets[b]) == 7


@pytest.mark.parametrize("bad", [
    lambda w: w[:-1], lambda w: w[::-1], lambda w: sorted(w[:-1] + [w[0]]),
    lambda w: sorted(w[1:] + ["n99999999"]),  # drops a listed wnid (n01498041)
])
def test_imagenet_bad_list(bad):
    with pytest.raises(NcdError):
        uno_imagenet_split_ids("B", bad(_all_wnids()))


def test_remap_targets():
    new, keep = remap_targets(np.array([3, 0, 7, 5, 1, 9, 3]), known=[3, 1], novel=[5, 9])
    assert keep.tolist() == [True, False, False, True, True, True, True]
    assert new[keep].tolist() == [0, 2, 1, 3, 0]
    with pytest.raises(NcdError):
        remap_targets(np.array([0]), [0, 1], [1])


RGB32 = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
GRAY8 = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8))
RGB300 = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 260, 3), dtype=np.uint8))
CASES = [
    (RGB32, "cifar10", {"large": 32, "small": 18, "eval": 32}, 3, 20),
    (GRAY8, "digits", {"large": 8, "small": 4, "eval": 8}, 1, 20),
    (RGB300, "imagenet", {"large": 224, "small": 96, "eval": 224}, 3, 4),
]


@pytest.mark.parametrize("img,name,sizes,ch,draws", CASES)
def test_transform_shapes(img, name, sizes, ch, draws):
    random.seed(0)
    torch.manual_seed(0)
    for kind, s in sizes.items():
        t = build_uno_transform(kind, get_info(name))
        for _ in range(draws):
            x = t(img)
            assert x.shape == (ch, s, s) and x.dtype == torch.float32


def test_transform_options():
    info = get_info("cifar10")
    t = build_uno_transform("large", info, solarize_p=1.0, equalize_p=1.0, jitter_p=1.0, padding=0)
    assert t(RGB32).shape == (3, 32, 32)
    assert build_uno_transform("small", info, small_size=12)(RGB32).shape == (3, 12, 12)
    norm = build_uno_transform("eval", info)  # no resize: the torchvision-free CenterCropNormalize
    assert tuple(norm.mean) == (0.491, 0.482, 0.447) and norm.size == (32, 32)  # UNO's CIFAR-10 numbers, not SCAN's
    stl = get_info("stl10")
    assert tuple(build_uno_transform("eval", stl).transforms[-1].mean) == stl.mean
    with pytest.raises(NcdError, match="kind"):
        build_uno_transform("medium", info)
    with pytest.raises(NcdError, match="crop_scale"):
        build_uno_transform("large", info, crop_scale=(0.2, 1))
    for bad in ({"size": 0}, {"flip_p": 1.5}, {"padding": -1}):
        with pytest.raises(NcdError):
            build_uno_transform("large", info, **bad)
