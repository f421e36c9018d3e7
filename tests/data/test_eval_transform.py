"""The evaluation transform without torchvision (:class:`ncd.data.transforms.CenterCropNormalize`) equals
torchvision's ``CenterCrop → ToTensor → Normalize`` bit for bit, and the digits split cache that ``prepare``
writes gives the same arrays as scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ncd.data import build_dataset, prepare_dataset
from ncd.data import datasets as D
from ncd.data.transforms import CenterCropNormalize, eval_transform


def _reference(size, mean, std):
    return T.Compose([T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("mode,h,w,size", [("L", 8, 8, 8), ("L", 9, 12, 7), ("RGB", 32, 32, 32), ("RGB", 33, 40, 28),
                                           ("RGB", 96, 96, (64, 80)), ("L", 8, 8, 5)])
@pytest.mark.parametrize("channels_in_stats", [1, 3])
def test_equal_to_torchvision_bit_for_bit(mode, h, w, size, channels_in_stats):
    rng = np.random.default_rng(h * 100 + w)
    shape = (h, w) if mode == "L" else (h, w, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    mean = tuple(rng.uniform(0.2, 0.6, channels_in_stats)) if mode == "RGB" or channels_in_stats == 1 else (0.3,)
    std = tuple(rng.uniform(0.1, 0.4, len(mean)))
    ours, ref = CenterCropNormalize(size, mean, std)(img), _reference(size, mean, std)(img)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("mode,h,w", [("L", 6, 6), ("RGBA", 10, 10), ("P", 10, 10), ("LA", 10, 10)])
def test_other_modes_and_smaller_images_go_through_torchvision(mode, h, w):
    rng = np.random.default_rng(1)
    if mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert(mode)
    mean, std = (0.5,), (0.25,)
    assert torch.equal(CenterCropNormalize(8, mean, std)(img), _reference(8, mean, std)(img))


def test_eval_transform_with_a_resize_is_torchvision_compose():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    t = eval_transform(32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), resize=36)
    ref = T.Compose([T.Resize(36), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)])
    assert isinstance(t, T.Compose) and torch.equal(t(img), ref(img))
    assert isinstance(eval_transform(32, (0.5,), (0.2,)), CenterCropNormalize)


def test_digits_cache_equals_scikit_learn_and_prepare_writes_it(tmp_path):
    root = tmp_path / "digits"
    prepare_dataset("digits", root)
    cache = root / D.DIGITS_CACHE
    assert cache.is_file()
    for split in ("train", "test"):
        cached, fresh = build_dataset("digits", root, split), D.load_digits_split(split)
        assert np.array_equal(cached.data, fresh.data) and np.array_equal(cached.targets, fresh.targets)
        assert cached.targets.dtype == np.int64
    assert len(build_dataset("digits", root, "train")) + len(build_dataset("digits", root, "test")) == 1797


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_a_damaged_digits_cache_is_ignored(tmp_path, damage):
    cache = D.write_digits_cache(tmp_path / D.DIGITS_CACHE)
    if damage == "truncate":
        cache.write_bytes(cache.read_bytes()[:200])
    elif damage == "garbage":
        cache.write_bytes(b"not an npz")
    else:
        with open(cache, "wb") as f:
            np.savez(f, images=np.zeros((3, 4, 4), np.uint8), targets=np.zeros(3, np.int64),
                     train=np.arange(2), test=np.arange(2, 3))
    ds = D.load_digits_split("test", cache=cache)
    assert np.array_equal(ds.data, D.load_digits_split("test").data)
