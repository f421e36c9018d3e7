"""CIFAR-10/100(-20) and STL-10 read from fabricated files in their real formats through the
real torchvision loaders, with the real md5 checks; downloads, mismatches, missing files."""

from __future__ import annotations

import re
import urllib.error

import numpy as np
import pytest
from datafab import (patch_cifar10, patch_cifar100, patch_stl10, write_cifar10, write_cifar100,
                      write_stl10)
from torchvision.datasets import utils as tv_utils

from ncd.data import (CIFAR20_SUPERCLASSES, CIFAR100_TO_20, build_dataset, dataset_ready,
                      get_info, prepare_dataset)
from ncd.errors import NcdError


def _pixels(ds) -> np.ndarray:
    return np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])


def test_cifar10_round_trip(tmp_path, monkeypatch):
    fab = write_cifar10(tmp_path)
    patch_cifar10(monkeypatch, fab["md5"])
    for split in ("train", "test"):
        ds = build_dataset("cifar10", tmp_path, split)
        x, y = fab[split]
        assert ds[0][0].mode == "RGB" and ds[0][0].size == (32, 32)
        np.testing.assert_array_equal(_pixels(ds), x)
        assert ds.targets.dtype == np.int64 and ds.targets.tolist() == y
        assert [ds[i][1] for i in range(len(ds))] == y and isinstance(ds[0][1], int)
    assert ds.classes[0] == "airplane"
    marker = prepare_dataset("cifar10", tmp_path, download=False)
    assert marker == tmp_path / "READY" and dataset_ready("cifar10", tmp_path)
    text = marker.read_text()
    assert "dataset: cifar10" in text and fab["md5"]["data_batch_3"] in text


def test_cifar100_and_20(tmp_path, monkeypatch):
    fab = write_cifar100(tmp_path)
    patch_cifar100(monkeypatch, fab["md5"])
    fine = build_dataset("cifar100", tmp_path, "train")
    coarse = build_dataset("cifar100-20", tmp_path, "train")
    np.testing.assert_array_equal(_pixels(coarse), fab["train"][0])
    assert fine.targets.tolist() == fab["train"][1]
    assert coarse.targets.tolist() == [int(CIFAR100_TO_20[f]) for f in fab["train"][1]]
    assert len(coarse.classes) == 20 and get_info("cifar100-20").num_classes == 20
    test = build_dataset("cifar100-20", tmp_path, "test")  # fine 0, 4, 30, 99, 41
    assert test.targets.tolist() == [4, 0, 0, 13, 19]


def test_cifar20_table():
    # METHODS.md 1.8: 20 superclasses of 5 fine classes each, every fine class once.
    fines = sorted(f for _, fs in CIFAR20_SUPERCLASSES for f in fs)
    assert fines == list(range(100))
    assert np.bincount(CIFAR100_TO_20).tolist() == [5] * 20
    assert CIFAR100_TO_20[[4, 1, 54, 9, 0, 22, 5, 6, 3, 12, 23, 15, 34, 26, 2, 27, 36, 47, 8, 41]
                          ].tolist() == list(range(20))


def test_stl10_splits(tmp_path, monkeypatch):
    fab = write_stl10(tmp_path)
    patch_stl10(monkeypatch, fab["md5"])
    train = build_dataset("stl10", tmp_path, "train")
    assert train[0][0].size == (96, 96) and train[0][0].mode == "RGB"
    np.testing.assert_array_equal(_pixels(train), fab["x"]["train"])  # column-major decoded
    assert train.targets.tolist() == fab["y"]["train"] and train.classes[1] == "bird"
    test = build_dataset("stl10", tmp_path, "test")
    assert test.targets.tolist() == fab["y"]["test"]
    unl = build_dataset("stl10", tmp_path, "unlabeled")
    np.testing.assert_array_equal(_pixels(unl), fab["x"]["unlabeled"])
    assert unl.targets.tolist() == [-1] * 5 and unl[0][1] == -1
    both = build_dataset("stl10", tmp_path, "train+unlabeled")
    assert len(both) == 9 and both.targets.tolist() == fab["y"]["train"] + [-1] * 5
    labelled = build_dataset("stl10", tmp_path, "train+test")  # the two-stage paper's 13,000 (AUDIT A3)
    assert labelled.targets.tolist() == fab["y"]["train"] + fab["y"]["test"]
    np.testing.assert_array_equal(_pixels(labelled), np.concatenate([fab["x"]["train"], fab["x"]["test"]]))
    assert get_info("stl10").pretrain_split == "train+unlabeled"


def test_checksum_mismatch_names_file(tmp_path):
    write_cifar10(tmp_path)  # official md5s kept: every fabricated file mismatches
    for download in (True, False):  # present-but-corrupt is never re-downloaded
        with pytest.raises(NcdError, match=r"data_batch_1 .*expected c99cafc152244af753f735de7"):
            prepare_dataset("cifar10", tmp_path, download=download)
    with pytest.raises(NcdError, match="checksum mismatch"):
        build_dataset("cifar10", tmp_path, "train")
    assert not (tmp_path / "READY").exists()


def test_corrupt_file_after_patch(tmp_path, monkeypatch):
    fab = write_stl10(tmp_path)
    patch_stl10(monkeypatch, fab["md5"])
    (tmp_path / "stl10_binary" / "test_y.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(NcdError, match=r"test_y\.bin.*expected " + fab["md5"]["test_y.bin"]):
        prepare_dataset("stl10", tmp_path)
    assert not (tmp_path / "READY").exists()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "cifar100-20", "stl10"])
def test_missing_without_download(tmp_path, name):
    root = tmp_path / "data" / name
    where = re.escape(str(root))
    with pytest.raises(NcdError, match=rf"'{name}' is not in {where}.*download: true"):
        prepare_dataset(name, root, download=False)
    with pytest.raises(NcdError, match=rf"'{name}' is not in {where}"):
        build_dataset(name, root, "train")
    assert not (root / "READY").exists()


def test_download_uses_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, root, filename=None, md5=None, **_):
        calls.append((url, filename, md5))
        patch_cifar10(monkeypatch, write_cifar10(tmp_path)["md5"])

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    marker = prepare_dataset("cifar10", tmp_path, download=True)
    assert marker.is_file() and calls == [(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a")]
    assert len(build_dataset("cifar10", tmp_path, "test", download=True)) == 3
    assert len(calls) == 1  # present and verified: no second download


def test_download_failure(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(NcdError, match=r"could not download dataset 'stl10'.*no network"):
        prepare_dataset("stl10", tmp_path / "stl")
    assert not (tmp_path / "stl" / "READY").exists()


def test_corrupt_archive_is_not_replaced(tmp_path, monkeypatch):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half a download")
    monkeypatch.setattr(tv_utils, "download_and_extract_archive",
                        lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(NcdError, match=r"cifar-10-python\.tar\.gz.*expected c58f30108f718f"):
        prepare_dataset("cifar10", tmp_path)
