"""Tiny datasets in the real on-disk formats of CIFAR-10/100, STL-10 and extracted ImageNet.

The fabricated files cannot match the official md5s, so the ``patch`` helpers point the
torchvision classes' checksum lists at the fabricated files: the real integrity check runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd
from torchvision.datasets.utils import calculate_md5


def pattern(n: int, h: int, w: int, c: int = 3, offset: int = 0) -> np.ndarray:
    """uint8 ``[n, h, w, c]`` images in which every index matters (a transposed row/col or a
    swapped channel changes the values)."""
    i, r, col, ch = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), np.arange(c),
                                indexing="ij")
    return ((i * 37 + r * 5 + col * 3 + ch * 101 + offset) % 256).astype(np.uint8)


def _dump(path: Path, obj: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return calculate_md5(path)


def _flat(images: np.ndarray) -> np.ndarray:
    # CIFAR rows: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path) -> dict:
    """5 train batches of 2 images + a test batch of 3; returns images, labels and md5s."""
    base = root / "cifar-10-batches-py"
    train_x, train_y, md5 = pattern(10, 32, 32), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], {}
    for b in range(5):
        sl = slice(2 * b, 2 * b + 2)
        md5[f"data_batch_{b + 1}"] = _dump(base / f"data_batch_{b + 1}", {
            "batch_label": f"training batch {b + 1} of 5", "labels": train_y[sl],
            "data": _flat(train_x[sl]), "filenames": [f"img{i}.png" for i in range(2)]})
    test_x, test_y = pattern(3, 32, 32, offset=7), [0, 7, 8]
    md5["test_batch"] = _dump(base / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test_y, "data": _flat(test_x),
        "filenames": ["a.png", "b.png", "c.png"]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    md5["batches.meta"] = _dump(base / "batches.meta", {
        "num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072})
    return {"train": (train_x, train_y), "test": (test_x, test_y), "md5": md5}


def patch_cifar10(monkeypatch: pytest.MonkeyPatch, md5: dict) -> None:
    monkeypatch.setattr(tvd.CIFAR10, "train_list",
                        [[f"data_batch_{b}", md5[f"data_batch_{b}"]] for b in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                              "md5": md5["batches.meta"]})


def write_cifar100(root: Path) -> dict:
    """Train: one image of each fine class 0..99 (in reverse order); test: 5 images."""
    base = root / "cifar-100-python"
    train_x, train_y = pattern(100, 32, 32), list(range(99, -1, -1))
    test_x, test_y = pattern(5, 32, 32, offset=11), [0, 4, 30, 99, 41]
    md5 = {}
    for split, (x, y) in {"train": (train_x, train_y), "test": (test_x, test_y)}.items():
        md5[split] = _dump(base / split, {
            "filenames": [f"{i}.png" for i in range(len(y))], "batch_label": split,
            "fine_labels": y, "coarse_labels": [0] * len(y), "data": _flat(x)})
    md5["meta"] = _dump(base / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                        "coarse_label_names": [f"c{i}" for i in range(20)]})
    return {"train": (train_x, train_y), "test": (test_x, test_y), "md5": md5}


def patch_cifar100(monkeypatch: pytest.MonkeyPatch, md5: dict) -> None:
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(tvd.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                               "md5": md5["meta"]})


def _stl_bin(path: Path, images: np.ndarray) -> str:
    # Column-major per channel: for each image, for each channel, columns one after another.
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())
    return calculate_md5(path)


def write_stl10(root: Path) -> dict:
    """4 train, 3 test, 5 unlabeled 96×96 images; 1-based label files."""
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    x = {"train": pattern(4, 96, 96), "test": pattern(3, 96, 96, offset=3),
         "unlabeled": pattern(5, 96, 96, offset=9)}
    y = {"train": [0, 9, 4, 2], "test": [5, 1, 0]}
    md5 = {f"{s}_X.bin": _stl_bin(base / f"{s}_X.bin", a) for s, a in x.items()}
    for s, labels in y.items():
        (base / f"{s}_y.bin").write_bytes(np.asarray(labels, np.uint8).__add__(1).tobytes())
        md5[f"{s}_y.bin"] = calculate_md5(base / f"{s}_y.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (base / "class_names.txt").write_text("\n".join(names) + "\n")
    (base / "fold_indices.txt").write_text("\n".join("0 1 2 3" for _ in range(10)) + "\n")
    return {"x": x, "y": y, "md5": md5}


def patch_stl10(monkeypatch: pytest.MonkeyPatch, md5: dict) -> None:
    train = ("train_X.bin", "train_y.bin", "unlabeled_X.bin")
    monkeypatch.setattr(tvd.STL10, "train_list", [[f, md5[f]] for f in train])
    monkeypatch.setattr(tvd.STL10, "test_list", [[f, md5[f]] for f in ("test_X.bin", "test_y.bin")])


def write_imagenet(root: Path, wnids: list[str], per_class: int = 2) -> None:
    """An already extracted ImageNet as torchvision.datasets.ImageNet expects it: ``meta.bin``
    plus ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (images 40×20, landscape)."""
    root.mkdir(parents=True, exist_ok=True)
    torch.save(({w: (f"class {w}",) for w in wnids}, [w for w in wnids for _ in range(per_class)]),
               root / "meta.bin")
    for split in ("train", "val"):
        for k, w in enumerate(wnids):
            (root / split / w).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 20), (k * 10, i * 50, 0)).save(
                    root / split / w / f"{w}_{i}.JPEG")
