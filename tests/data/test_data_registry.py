"""Registry facts, digits, imagefolder and the error messages."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ncd.data import DATASETS, build_dataset, dataset_ready, get_info, prepare_dataset
from ncd.errors import NcdError

NAMES = ["digits", "cifar10", "cifar100", "cifar100-20", "stl10", "imagenet", "imagenet-50",
         "imagenet-100", "imagenet-200", "imagefolder"]


def test_registry_facts():
    assert sorted(DATASETS) == sorted(NAMES)
    for name, info in DATASETS.items():
        assert info.name == name and len(info.mean) == len(info.std) == info.channels
        assert {info.train_split, info.pretrain_split, info.test_split} <= set(info.splits) | {
            "train+unlabeled"}
        assert info.downloadable == (not name.startswith("image"))
    c10, c20 = get_info("cifar10"), get_info("cifar100-20")
    assert (c10.crop_size, c10.cutout, c10.mean) == (32, 16, (0.4914, 0.4822, 0.4465))
    assert c20.std == (0.2675, 0.2565, 0.2761) and get_info("cifar100").mean == c20.mean
    assert get_info("cifar100").num_classes == 100
    stl = get_info("stl10")
    assert (stl.image_size, stl.crop_size, stl.cutout) == (96, 96, 32)
    assert stl.mean == (0.485, 0.456, 0.406)
    inet = get_info("imagenet-100")
    assert (inet.num_classes, inet.image_size, inet.crop_size, inet.cutout, inet.test_split) == (
        100, 256, 224, 75, "val")
    d = get_info("digits")
    assert (d.channels, d.image_size, d.crop_size, d.cutout, d.num_classes) == (1, 8, 8, 3, 10)


def test_bad_names():
    with pytest.raises(NcdError, match=r"unknown dataset 'mnist'; expected one of: digits, cifar"):
        get_info("mnist")
    with pytest.raises(NcdError, match=r"unknown split 'val' for dataset 'cifar10'; expected one "
                                       r"of: train, test"):
        build_dataset("cifar10", "x", "val")
    with pytest.raises(NcdError, match=r"unknown split 'test' .*train, val"):
        build_dataset("imagenet-50", "x", "test")
    with pytest.raises(NcdError, match="unknown option.*image_size.*'digits'"):
        build_dataset("digits", "x", "train", image_size=3)
    with pytest.raises(NcdError, match="unknown dataset"):
        dataset_ready("nope", "x")


def test_digits(tmp_path):
    from sklearn.datasets import load_digits

    train = build_dataset("digits", tmp_path, "train")
    test = build_dataset("digits", tmp_path, "test")
    assert (len(train), len(test)) == (1257, 540)
    img, target = train[0]
    assert img.mode == "L" and img.size == (8, 8) and isinstance(target, int)
    # Stratified: every class keeps ~70 % of its images in train.
    counts = np.bincount(load_digits().target)
    assert np.all(np.abs(np.bincount(train.targets) - 0.7 * counts) <= 1)
    assert np.bincount(train.targets, minlength=10).sum() + np.bincount(test.targets).sum() == 1797
    again = build_dataset("digits", tmp_path, "train")
    np.testing.assert_array_equal(again.data, train.data)
    np.testing.assert_array_equal(again.targets, train.targets)
    # 0..16 -> 0..255, and the pixels are the sklearn ones.
    assert train.data.dtype == np.uint8 and train.data.max() == 255
    raw = load_digits().images
    assert set(np.unique(train.data)) <= set(np.rint(np.arange(17) * 255 / 16).astype(int))
    assert any(np.array_equal(np.rint(r * 255 / 16), np.asarray(img)) for r in raw)
    # The hard-coded normalisation is the train split's.
    x = train.data.astype(np.float64) / 255
    info = get_info("digits")
    assert info.mean[0] == pytest.approx(x.mean(), abs=1e-4)
    assert info.std[0] == pytest.approx(x.std(), abs=1e-4)


def test_prepare_digits(tmp_path):
    assert not dataset_ready("digits", tmp_path / "d")
    marker = prepare_dataset("digits", tmp_path / "d")
    assert marker == tmp_path / "d" / "READY" and dataset_ready("digits", tmp_path / "d")
    assert "dataset: digits" in marker.read_text()
    # the marker and the split cache the later jobs read instead of importing scikit-learn; no temp files
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["READY", "digits.npz"]


def _img(path, size=(30, 20), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_imagefolder_labeled(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            _img(tmp_path / split / cls / "a.png")
    _img(tmp_path / "train" / "dog" / "b.png", color=(0, 0, 255))
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    train = build_dataset("imagefolder", tmp_path, "train", image_size=16)
    assert len(train) == 3 and train.targets.tolist() == [0, 1, 1]
    assert train.classes == ["cat", "dog"]
    img, t = train[2]
    assert img.size == (16, 16) and img.mode == "RGB" and t == 1
    assert img.getpixel((8, 8)) == (0, 0, 255)
    assert len(build_dataset("imagefolder", tmp_path, "test")) == 2
    assert build_dataset("imagefolder", tmp_path, "test")[0][0].size == (224, 224)
    info = get_info("imagefolder", tmp_path, image_size=64)
    assert (info.num_classes, info.image_size, info.crop_size, info.cutout) == (2, 64, 64, 21)
    assert get_info("imagefolder", tmp_path).cutout == 75
    marker = prepare_dataset("imagefolder", tmp_path)
    assert "train: 3 images, 2 classes" in marker.read_text()


def test_imagefolder_unlabeled(tmp_path):
    _img(tmp_path / "x1.png")
    _img(tmp_path / "x2.JPG")
    for split in ("train", "test"):
        ds = build_dataset("imagefolder", tmp_path, split, image_size=8)
        assert len(ds) == 2 and ds.targets.tolist() == [-1, -1] and ds[1][1] == -1
        assert ds[0][0].size == (8, 8)
    assert get_info("imagefolder", tmp_path).num_classes == 0


def test_imagefolder_missing(tmp_path):
    with pytest.raises(NcdError, match="does not exist"):
        prepare_dataset("imagefolder", tmp_path / "mine")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NcdError, match="no images in"):
        prepare_dataset("imagefolder", tmp_path / "empty")
    assert not (tmp_path / "empty" / "READY").exists()


def test_datasets_pickle(tmp_path):
    import pickle

    _img(tmp_path / "x.png")
    for name in ("digits", "imagefolder"):
        ds = build_dataset(name, tmp_path, "test")
        copy = pickle.loads(pickle.dumps(ds))
        assert len(copy) == len(ds)
        np.testing.assert_array_equal(np.asarray(copy[0][0]), np.asarray(ds[0][0]))


@pytest.mark.parametrize("shape,channels_first", [((6, 8, 8), False), ((5, 7, 9, 3), False), ((4, 3, 6, 10), True)])
def test_raw_image_is_pil_to_tensor_of_the_image(shape: tuple, channels_first: bool) -> None:
    """The batched path's uint8 tensors come straight from the array, equal to the PIL round trip."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from ncd.data.batched import RawImages, raw_image
    from ncd.data.datasets import ArrayDataset

    data = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    ds = ArrayDataset(data, np.arange(shape[0]) % 3, ["a", "b", "c"], channels_first=channels_first)
    for i in range(shape[0]):
        img, target = ds[i]
        got, t = ds.raw_image(i)
        assert got.dtype == torch.uint8 and torch.equal(got, pil_to_tensor(img)) and t == target
        assert torch.equal(RawImages(ds)[i][0]["image"], got)
    got[...] = 0  # a copy: the dataset's array is not touched
    assert data.any()
    # with a transform the item goes through it (and PIL), as before
    flip = ArrayDataset(data, np.zeros(shape[0]), ["a"], transform=lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
                        channels_first=channels_first)
    assert torch.equal(raw_image(flip, 1)[0], pil_to_tensor(flip[1][0]))
    assert not torch.equal(raw_image(flip, 1)[0], ds.raw_image(1)[0])
