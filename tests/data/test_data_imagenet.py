"""ImageNet and SCAN's subsets on a fabricated, already extracted ImageNet folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from datafab import write_imagenet

from ncd.data import build_dataset, imagenet_subset_classes, prepare_dataset
from ncd.errors import NcdError

IN50_FIRST, IN50_LAST = "n01601694", "n07753592"  # METHODS.md 1.8


@pytest.mark.parametrize("n", [50, 100, 200])
def test_class_lists(n):
    classes = imagenet_subset_classes(n)
    wnids = [w for w, _ in classes]
    assert len(classes) == n and len(set(wnids)) == n and wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) and name for w, name in classes)
    assert set(wnids) >= set(w for w, _ in imagenet_subset_classes(50))


def test_class_list_bad_size():
    with pytest.raises(NcdError, match="50, 100 or 200"):
        imagenet_subset_classes(10)


def test_subset_filtering(tmp_path):
    in50 = [w for w, _ in imagenet_subset_classes(50)]
    assert (in50[0], in50[-1]) == (IN50_FIRST, IN50_LAST)
    outsider = "n01440764"  # tench: not in ImageNet-50
    assert outsider not in in50
    write_imagenet(tmp_path, [outsider, in50[0], in50[3], in50[49]])
    with pytest.warns(UserWarning, match="47 of 50 class folders"):
        sub = build_dataset("imagenet-50", tmp_path, "train")
    assert sorted(sub.targets.tolist()) == [0, 0, 3, 3, 49, 49]
    assert all(outsider not in p for p in sub.paths)
    img, target = sub[0]
    assert img.mode == "RGB" and img.size == (512, 256)  # short side 256, aspect kept
    assert target == 0 and len(sub.classes) == 50
    with pytest.warns(UserWarning):
        assert len(build_dataset("imagenet-50", tmp_path, "val")) == 6
    full = build_dataset("imagenet", tmp_path, "val")
    assert len(full) == 8 and sorted(set(full.targets.tolist())) == [0, 1, 2, 3]
    assert full[0][0].size == (40, 20)  # the full ImageNet is read at full resolution (AUDIT A5)
    with pytest.warns(UserWarning):
        marker = prepare_dataset("imagenet-50", tmp_path)
    assert "val: 6 images" in marker.read_text()


def test_imagenet_missing(tmp_path):
    root = tmp_path / "imagenet"
    for name in ("imagenet", "imagenet-100"):
        with pytest.raises(NcdError, match=rf"cannot be downloaded.*{re.escape(str(root))}.*"
                                           r"ILSVRC2012_devkit_t12\.tar\.gz.*"
                                           r"ILSVRC2012_img_train\.tar"):
            prepare_dataset(name, root, download=True)
    with pytest.raises(NcdError, match=r"ILSVRC2012_img_val\.tar"):
        build_dataset("imagenet", root, "val")
    assert not (root / "READY").exists()


def test_imagenet_archive_checksum(tmp_path):
    # meta.bin and train/ extracted, val still an archive (a fake one): torchvision's md5 check
    # fails and the message names the archive and the md5 it expects.
    write_imagenet(tmp_path, ["n01601694"])
    shutil.rmtree(tmp_path / "val")
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"not the archive")
    with pytest.raises(NcdError, match=r"ILSVRC2012_img_val\.tar.*29b22e2961454d5413ddabcf"):
        prepare_dataset("imagenet", tmp_path)
    assert not (tmp_path / "READY").exists()


def test_resize_policy_per_method(tmp_path):
    """AUDIT A5: only SCAN's ImageNet subsets are pre-resized to short side 256 (SCAN's loader does that
    before its crops); UNO, SeLa and CLD crop from the full-resolution image, as their official loaders."""
    import yaml

    from ncd.data.datasets import load_imagenet

    write_imagenet(tmp_path, [IN50_FIRST, "n01440764"])
    with pytest.warns(UserWarning):
        sub = build_dataset("imagenet-50", tmp_path, "train")
    assert sub.resize == 256 and sub[0][0].size == (512, 256)
    full = build_dataset("imagenet", tmp_path, "train")
    assert full.resize is None and full[0][0].size == (40, 20)
    assert load_imagenet(tmp_path, "train", resize=32)[0][0].size == (64, 32)
    with pytest.raises(NcdError, match="positive short side, got 0"):
        load_imagenet(tmp_path, "train", resize=0)
    paper_yaml = Path(__file__).resolve().parents[2] / "workflow/experiments/paper.yaml"
    paper = yaml.safe_load(paper_yaml.read_text())["experiments"]
    inet = {n: (e["method"], e["dataset"]) for n, e in paper.items() if e["dataset"].startswith("imagenet")}
    assert {m for m, _ in inet.values()} >= {"scan", "uno", "sela", "cld"}
    for name, (method, dataset) in inet.items():
        # SCAN reads its subsets (resized); every other method the full, unresized ImageNet
        assert (dataset != "imagenet") == (method == "scan"), name
