"""SCAN's augmentations: shapes, the 14 ops, RandAugmentOurs' draws and Cutout."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ncd.data import Cutout, RandAugmentOurs, build_transform, get_info
from ncd.data import cld as cld_data
from ncd.data import uno as uno_data
from ncd.data.transforms import OPS, GaussianBlur, apply_op
from ncd.errors import NcdError

RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
GRAY = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8))
CASES = [(RGB, "cifar10", (3, 32, 32)), (GRAY, "digits", (1, 8, 8))]


@pytest.mark.parametrize("kind", ["simclr", "strong", "val", "weak"])
@pytest.mark.parametrize("img,name,shape", CASES)
def test_shapes(kind, img, name, shape):
    t = build_transform(kind, get_info(name))
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(25):  # many draws: every branch (grayscale, jitter, ops) gets exercised
        x = t(img)
        assert x.shape == shape and x.dtype == torch.float32


def test_val_is_normalised_centre_crop():
    info = get_info("stl10")
    img = Image.new("RGB", (100, 120), (255, 0, 128))
    x = build_transform("val", info)(img)
    assert x.shape == (3, 96, 96)
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    expect = (torch.tensor([1.0, 0.0, 128 / 255]) - mean) / std
    torch.testing.assert_close(x[:, 0, 0], expect)


def test_overrides():
    info = get_info("cifar10")
    assert build_transform("val", info, crop_size=24)(RGB).shape == (3, 24, 24)
    assert build_transform("simclr", info, crop_size=16, jitter_p=1.0, grayscale_p=1.0,
                           crop_scale=(0.5, 1.0), jitter=(0.1, 0.1, 0.1, 0.0), flip_p=0.0
                           )(RGB).shape == (3, 16, 16)
    t = build_transform("strong", info, num_ops=0, cutout=0, flip_p=0.0)
    torch.testing.assert_close(t(RGB), build_transform("val", info)(RGB))  # everything off
    strong = build_transform("strong", info).transforms
    assert isinstance(strong[2], RandAugmentOurs) and strong[2].num_ops == 4
    assert isinstance(strong[-1], Cutout) and strong[-1].length == 16


def test_simclr_grayscale_keeps_channels():
    info = get_info("cifar10")
    x = build_transform("simclr", info, grayscale_p=1.0, jitter_p=0.0)(RGB)
    assert x.shape == (3, 32, 32)
    raw = x * torch.tensor(info.std)[:, None, None] + torch.tensor(info.mean)[:, None, None]
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)


def test_bad_kind_and_override():
    info = get_info("cifar10")
    with pytest.raises(NcdError, match="unknown transform kind 'fancy'; expected one of: simclr, "
                                       "strong, val, weak"):
        build_transform("fancy", info)
    with pytest.raises(NcdError, match="unknown option.*num_ops.*'val'.*crop_size"):
        build_transform("val", info, num_ops=2)
    with pytest.raises(NcdError, match="unknown augmentation op"):
        RandAugmentOurs(ops=["Blur"])


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("img", [RGB, GRAY], ids=["RGB", "L"])
def test_each_op_runs(name, img):
    _, lo, hi, _ = OPS[name]
    for v in ([0.0] if lo is None else [lo, hi, -hi if lo < 0 else (lo + hi) / 2]):
        out = apply_op(img, name, v)
        assert out.mode == img.mode and out.size == img.size


def test_op_ranges():
    assert len(OPS) == 14
    ranges = {n: (lo, hi, s) for n, (_, lo, hi, s) in OPS.items()}
    assert ranges["Rotate"] == (-30, 30, True) and ranges["Solarize"] == (0, 256, False)
    assert ranges["Posterize"] == (4, 8, False)
    for n in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert ranges[n] == (0.05, 0.95, False)
    for n in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
        assert ranges[n] == (-0.1, 0.1, True)


def test_op_semantics():
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    a = np.asarray(img).astype(int)
    # Translate by 0.25 × width moves content by 2 pixels.
    np.testing.assert_array_equal(np.asarray(apply_op(img, "TranslateX", 0.25))[:, :-2], a[:, 2:])
    np.testing.assert_array_equal(np.asarray(apply_op(img, "Posterize", 4.9)), a & 0xF0)  # int(4.9)
    np.testing.assert_array_equal(np.asarray(apply_op(img, "Solarize", 128)),
                                  np.where(a < 128, a, 255 - a))
    dim = np.asarray(apply_op(img, "Brightness", 0.5)).astype(int)
    assert np.all(np.abs(dim - a * 0.5) <= 1)


class FakeRng:
    """Deterministic stand-in for ``random``: scripted choices, recorded draws."""

    def __init__(self, choices, sign_draw=0.0):
        self.choices, self.sign_draw = list(choices), sign_draw
        self.uniform_calls, self.chosen = [], []

    def choice(self, seq):
        self.chosen.append(self.choices.pop(0))
        return self.chosen[-1]

    def uniform(self, lo, hi):
        self.uniform_calls.append((lo, hi))
        return hi

    def random(self):
        return self.sign_draw


def test_randaugment_applies_num_ops(monkeypatch):
    applied = []
    monkeypatch.setattr("ncd.data.transforms.apply_op",
                        lambda img, name, v: applied.append((name, v)) or img)
    rng = FakeRng(["Rotate", "Identity", "Rotate", "Color", "Posterize"])
    RandAugmentOurs(num_ops=4, rng=rng)(RGB)
    assert [n for n, _ in applied] == ["Rotate", "Identity", "Rotate", "Color"]  # with replacement
    assert applied[0][1] == -30.0 and applied[1][1] == 0.0 and applied[3][1] == 0.95  # p<0.5: flip
    assert rng.uniform_calls == [(-30.0, 30.0), (-30.0, 30.0), (0.05, 0.95)]
    applied.clear()
    RandAugmentOurs(num_ops=2, rng=FakeRng(["ShearX", "TranslateY"], sign_draw=0.9))(RGB)
    assert applied == [("ShearX", 0.1), ("TranslateY", 0.1)]  # p>=0.5: sign kept


def test_randaugment_draws_are_uniform():
    aug = RandAugmentOurs(rng=random.Random(0))
    names = [aug.rng.choice(aug.ops) for _ in range(14000)]  # the call __call__ makes
    counts = np.unique(names, return_counts=True)[1]
    assert len(counts) == 14 and counts.min() > 850
    rot = [aug.sample_magnitude("Rotate") for _ in range(2000)]
    assert min(rot) >= -30 and max(rot) <= 30 and 0.4 < np.mean(np.array(rot) < 0) < 0.6
    col = [aug.sample_magnitude("Contrast") for _ in range(500)]
    assert 0.05 <= min(col) and max(col) <= 0.95


class CutRng:
    def __init__(self, side, cy, cx):
        self.side, self.centre = side, [cy, cx]

    def randint(self, lo, hi):
        assert (lo, hi) == (1, 16)
        return self.side

    def randrange(self, n):
        return self.centre.pop(0)


def test_cutout_square_and_clipping():
    x = torch.ones(3, 32, 32)
    out = Cutout(16, rng=CutRng(side=6, cy=10, cx=20))(x)
    assert torch.equal(x, torch.ones(3, 32, 32))  # input untouched
    zero = out[0] == 0
    assert zero.sum() == 36 and zero[7:13, 17:23].all() and torch.equal(out[0], out[2])
    corner = Cutout(16, rng=CutRng(side=16, cy=0, cx=31))(x)[0] == 0
    assert corner.sum() == 8 * 9 and corner[:8, 23:].all()  # clipped at the border


def test_cutout_random_sides():
    random.seed(3)
    sides = set()
    for _ in range(300):
        out = Cutout(4)(torch.ones(1, 40, 40))[0]
        rows, cols = torch.nonzero(out == 0, as_tuple=True)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert h <= 4 and w <= 4
        sides.add(int(max(h, w)))
    assert sides == {1, 2, 3, 4}
    assert torch.equal(Cutout(0)(torch.ones(1, 4, 4)), torch.ones(1, 4, 4))


@pytest.mark.parametrize("kind", ["simclr", "strong", "val"])
def test_transforms_pickle(kind):
    # DataLoader workers started with spawn/forkserver receive the transform by pickle.
    t = pickle.loads(pickle.dumps(build_transform(kind, get_info("cifar10"))))
    assert t(RGB).shape == (3, 32, 32)


def test_one_pil_gaussian_blur_for_uno_and_cld():
    """UNO's ``GaussianBlur`` and CLD's ``PILGaussianBlur`` are the one blur: radius ~ U(σ_lo, σ_hi) from
    Python's ``random``, one draw per image."""
    assert uno_data.GaussianBlur is GaussianBlur and cld_data.PILGaussianBlur is GaussianBlur
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    blur = GaussianBlur((0.5, 3))
    assert blur.sigma == (0.5, 3.0) and repr(blur) == "GaussianBlur(sigma=(0.5, 3.0))"
    random.seed(4)
    got = [np.asarray(blur(img)) for _ in range(2)]
    random.seed(4)
    want = [np.asarray(img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.5, 3.0)))) for _ in range(2)]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert not np.array_equal(got[0], got[1])  # a fresh radius per image
