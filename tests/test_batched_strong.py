"""SCAN's strong augmentation on the batched backend (ncd.data.batched_strong) against the PIL path.

* every random parameter (flip, crop offset, op choice, magnitude and sign, Cutout side and centre)
  follows the PIL path's distribution: 10,000 draws each, two-sample tests against draws made the
  way ``build_transform("strong")`` makes them (torchvision's ``get_params``, ``RandAugmentOurs``'s
  own sampler, ``Cutout``'s calls on a ``random.Random``);
* each of the 14 ops, given the same magnitude, gives the PIL op's pixels (``apply_op``) on L and RGB
  images, to within the stated tolerance; so does the whole view for a fixed parameter set;
* the parameters of an image are a function of (seed, epoch, index, view) alone.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T

from ncd.data.batched_strong import OP_NAMES, S_FLIP, S_LEFT, S_TOP, StrongViews, apply_op_batch, strong_views
from ncd.data.registry import get_info
from ncd.data.transforms import OPS, Cutout, RandAugmentOurs, apply_op
from ncd.errors import NcdError

N_DRAWS = 10_000


def _images(mode: str, n: int = 40, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    """Images with flat areas, gradients and noise (so histograms, edges and borders all matter)."""
    rng = np.random.default_rng(seed)
    c = 3 if mode == "RGB" else 1
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        noise = rng.integers(0, 256, size=(size, size, c))
        grad = ((xx * 13 + yy * 7 + i * 5) % 256)[..., None].repeat(c, axis=2)
        flat = np.full((size, size, c), rng.integers(0, 256))
        pick = rng.random((size, size, 1))
        out.append(np.where(pick < 0.4, noise, np.where(pick < 0.8, grad, flat)).astype(np.uint8))
    return out


def _pil(a: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(a[..., 0] if mode == "L" else a, mode)


def _tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack([a.reshape(a.shape[0], a.shape[1], -1) for a in arrays])).permute(0, 3, 1, 2)


# geometric ops land on PIL's pixel grid except where a sample falls exactly on a pixel edge (PIL
# accumulates its coordinates step by step, here they are computed per pixel): a few pixels differ
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_matches_pil(name: str, mode: str) -> None:
    imgs = _images(mode)
    rng = np.random.default_rng(1)
    _, lo, hi, signed = OPS[name]
    v = rng.uniform(lo, hi, size=len(imgs)) if lo is not None else np.zeros(len(imgs))
    if signed:
        v = v * np.where(rng.random(len(imgs)) < 0.5, -1.0, 1.0)
    out = apply_op_batch(_tensor(imgs).float(), name, torch.from_numpy(v))
    ref = _tensor([np.asarray(apply_op(_pil(a, mode), name, float(m))) for a, m in zip(imgs, v)]).float()
    d = (out - ref).abs()
    if name in GEOMETRIC:
        assert float((d > 0).float().mean()) <= 0.005, (name, mode, float((d > 0).float().mean()))
    else:
        assert float(d.max()) <= 1.0, (name, mode, float(d.max()))  # AutoContrast: float rounding, ±1
        assert float((d > 0).float().mean()) <= 0.01


def _pil_view(a: np.ndarray, mode: str, p: np.ndarray, views: StrongViews, info) -> torch.Tensor:
    """The PIL path with the parameters of row ``p``: flip, crop, the ops, ToTensor, Normalize, Cutout."""
    img = _pil(a, mode)
    if p[S_FLIP] > 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left, s = int(p[S_TOP]), int(p[S_LEFT]), views.size
    img = img.crop((left, top, left + s, top + s))
    for k in range(views.num_ops):
        img = apply_op(img, views.ops[int(p[views.s_ops + 2 * k])], float(p[views.s_ops + 2 * k + 1]))
    x = T.Normalize(info.mean, info.std)(T.ToTensor()(img))
    if views.cutout:
        side, cy, cx = (int(p[views.s_cut + j]) for j in range(3))
        y0, x0 = cy - side // 2, cx - side // 2
        x[..., max(0, y0):min(s, y0 + side), max(0, x0):min(s, x0 + side)] = 0
    return x


@pytest.mark.parametrize("dataset, mode, size, crop", [("digits", "L", 8, 8), ("cifar10", "RGB", 16, 12)])
def test_whole_view_matches_pil_for_fixed_parameters(dataset: str, mode: str, size: int, crop: int) -> None:
    info = get_info(dataset)
    views = StrongViews(crop, info.mean[: 1 if mode == "L" else 3], info.std[: 1 if mode == "L" else 3],
                        cutout=4, seed=3)
    imgs = _images(mode, n=200, size=size, seed=2)
    keys = torch.stack([torch.zeros(200, dtype=torch.long), torch.arange(200)], dim=1)
    p = views.params(keys, size, size)
    out = views.apply(_tensor(imgs), p)
    ref = torch.stack([_pil_view(a, mode, row, views, info) for a, row in zip(imgs, p.numpy())])
    std = torch.tensor(info.std[: out.shape[1]]).view(1, -1, 1, 1)
    levels = ((out - ref).abs() * std * 255).round()  # the difference in grey levels
    assert float((levels > 1).float().mean()) <= 0.01, float((levels > 1).float().mean())
    assert float(levels.mean()) <= 0.1


def _pil_draws(n: int, size: int, crop: int, cutout: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` draws as the PIL path makes them: RandomHorizontalFlip's and RandomCrop's torch draws,
    RandAugmentOurs' op choices and magnitudes, Cutout's side and centre."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    ra, cut = RandAugmentOurs(4, rng=rng), Cutout(cutout, rng=rng)
    img = torch.zeros(1, size, size)
    out: dict[str, list] = {k: [] for k in ("flip", "top", "left", "op", "side", "cy", "cx")}
    out.update({f"mag:{o}": [] for o in OP_NAMES})
    for _ in range(n):
        out["flip"].append(float(torch.rand(1) < 0.5))
        i, j, _, _ = T.RandomCrop.get_params(img, (crop, crop))
        out["top"].append(i)
        out["left"].append(j)
        for _ in range(4):
            name = rng.choice(ra.ops)
            out["op"].append(OP_NAMES.index(name))
            out[f"mag:{name}"].append(ra.sample_magnitude(name))
        side = rng.randint(1, cut.length)
        out["side"].append(side)
        out["cy"].append(rng.randrange(crop))
        out["cx"].append(rng.randrange(crop))
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def _batched_draws(n: int, size: int, crop: int, cutout: int, seed: int = 0) -> dict[str, np.ndarray]:
    v = StrongViews(crop, [0.5], [0.5], cutout=cutout, seed=seed)
    p = v.params(torch.stack([torch.full((n,), 2), torch.arange(n)], dim=1), size, size).numpy()
    ops = p[:, [v.s_ops + 2 * k for k in range(4)]].ravel().astype(int)
    mags = p[:, [v.s_ops + 2 * k + 1 for k in range(4)]].ravel()
    out = {"flip": p[:, S_FLIP], "top": p[:, S_TOP], "left": p[:, S_LEFT], "op": ops.astype(float),
           "side": p[:, v.s_cut], "cy": p[:, v.s_cut + 1], "cx": p[:, v.s_cut + 2]}
    out.update({f"mag:{o}": mags[ops == j] for j, o in enumerate(OP_NAMES)})
    return out


def _chi2_same(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of a two-sample χ² test that two samples of integer codes share one distribution."""
    cats = np.union1d(a, b)
    table = np.array([[np.sum(a == c) for c in cats], [np.sum(b == c) for c in cats]])
    return float(stats.chi2_contingency(table)[1])


def test_parameter_distributions_match_the_pil_path() -> None:
    pil, bat = _pil_draws(N_DRAWS, 12, 8, 5), _batched_draws(N_DRAWS, 12, 8, 5)
    for k in ("flip", "top", "left", "op", "side", "cy", "cx"):
        assert _chi2_same(pil[k], bat[k]) > 1e-3, k
    assert set(np.unique(bat["top"])) == set(range(5)) and set(np.unique(bat["side"])) == set(range(1, 6))
    for o in OP_NAMES:
        a, b = pil[f"mag:{o}"], bat[f"mag:{o}"]
        assert len(b) > 0.5 * 4 * N_DRAWS / len(OP_NAMES), o  # each op drawn about 1/14 of the time
        if OPS[o][1] is None:
            assert not b.any(), o
            continue
        assert stats.ks_2samp(a, b).pvalue > 1e-3, o
        lo, hi = OPS[o][1], OPS[o][2]
        assert np.all(np.abs(b) >= lo - 1e-12) if OPS[o][3] else np.all((b >= lo) & (b < hi)), o
        if OPS[o][3]:
            assert abs(np.mean(b < 0) - 0.5) < 0.05, o  # the sign flips half of the time


def test_parameters_depend_on_seed_epoch_index_and_view_only() -> None:
    v = StrongViews(8, [0.5], [0.5], cutout=3, seed=7, view=1)
    keys = torch.tensor([[0, 5], [0, 9], [3, 5]])
    p = v.params(keys, 8, 8)
    # row by row, in any batch
    for r in range(3):
        assert torch.equal(v.params(keys[r:r + 1], 8, 8), p[r:r + 1])
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[0], p[2])  # another index, another epoch
    assert not torch.equal(StrongViews(8, [0.5], [0.5], cutout=3, seed=7, view=0).params(keys, 8, 8), p)
    assert not torch.equal(StrongViews(8, [0.5], [0.5], cutout=3, seed=8, view=1).params(keys, 8, 8), p)
    imgs = _tensor(_images("L", n=3, size=8))
    assert torch.equal(v(imgs, keys), v(imgs, keys))


def test_strong_views_take_the_pil_defaults_and_refuse_bad_input() -> None:
    info = get_info("cifar10")
    v = strong_views(info, seed=1)
    assert (v.size, v.num_ops, v.cutout, v.flip_p) == (info.crop_size, 4, info.cutout, 0.5)
    assert strong_views(info, cutout=0).cutout == 0 and strong_views(get_info("digits"), flip_p=0.0).flip_p == 0.0
    with pytest.raises(NcdError, match="does not resize first"):
        strong_views(info, resize=40)
    with pytest.raises(NcdError, match="unknown"):
        strong_views(info, shear=3)
    with pytest.raises(NcdError, match="uint8 batch"):
        v(torch.zeros(2, 3, 32, 32), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(NcdError, match="at least the crop size"):
        v.params(torch.zeros(2, 2, dtype=torch.long), 16, 16)
    with pytest.raises(NcdError, match="unknown augmentation op"):
        StrongViews(8, [0.5], [0.5], ops=["Rotate", "Blur"])


@pytest.mark.parametrize("dataset, mode, size", [("digits", "L", 8), ("stl10", "RGB", 20)])
def test_center_views_equal_the_val_transform(dataset: str, mode: str, size: int) -> None:
    from ncd.data import build_transform
    from ncd.data.batched import center_views

    info = get_info(dataset)
    crop = 8 if dataset == "digits" else 16
    imgs = _images(mode, n=5, size=size)
    ref = torch.stack([build_transform("val", info, crop_size=crop)(_pil(a, mode)) for a in imgs])
    out = center_views(info, crop_size=crop)(_tensor(imgs))
    assert torch.allclose(out, ref, atol=1e-6)


def test_raw_neighbors_draw_the_neighbour_the_pil_path_draws() -> None:
    """Under SeededItems, RawNeighbors picks the neighbour NeighborsDataset picks for the same
    (seed, epoch, index): the batched path trains on the same pairs."""
    from torchvision.transforms import functional as TF

    from ncd.data.batched import RawNeighbors
    from ncd.data.wrappers import NeighborsDataset
    from ncd.methods.common import SeededItems

    imgs = [_pil(a, "L") for a in _images("L", n=30, size=8, seed=4)]
    base = [(im, k % 3) for k, im in enumerate(imgs)]
    nb = np.stack([np.roll(np.arange(30), -k)[:6] for k in range(30)])
    raw = SeededItems(RawNeighbors(base, nb, 4), seed=5)
    pil = SeededItems(NeighborsDataset(base, nb, TF.pil_to_tensor, TF.pil_to_tensor, 4), seed=5)
    picked = set()
    for epoch in (0, 3):
        for i in range(30):
            item, target, idx = raw[(epoch, i)]
            anchor, neighbor, t2, i2 = pil[(epoch, i)]
            assert torch.equal(item["image"], anchor) and torch.equal(item["neighbor"], neighbor)
            assert (target, idx) == (t2, i2) and item["key"].tolist() == [epoch, i]
            picked.add(int(np.flatnonzero([torch.equal(neighbor, TF.pil_to_tensor(im)) for im in imgs])[0]) - i)
    assert len(picked) > 2  # several columns of the table are drawn
    with pytest.raises(NcdError, match="neighbour table has 29 rows"):
        RawNeighbors(base, nb[:29], 4)
