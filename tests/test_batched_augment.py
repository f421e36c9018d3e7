"""The batched augmentation backend (ncd.data.batched) against the PIL path it replaces.

* its random parameters follow the PIL transform's distributions (10,000 draws each, two-sample
  tests against torchvision's own ``get_params`` draws);
* for a fixed parameter set, its pixels equal the PIL ops' (torchvision's functional ops on PIL
  images) to within a stated number of grey levels;
* each image's views are a function of (seed, epoch, index, view) alone.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ncd.data import build_dataset, build_transform
from ncd.data.batched import (
    P_FACTORS,
    P_FLIP,
    P_GRAY,
    P_H,
    P_JITTER,
    P_LEFT,
    P_ORDER,
    P_TOP,
    P_W,
    RawImages,
    SimCLRViews,
    _shr,
    apply_views,
    hue_shift,
    key_hash,
    simclr_views,
)
from ncd.data.registry import get_info
from ncd.errors import NcdError
from ncd.methods.common import SeededItems, derive_seed

N_DRAWS = 10_000
# the digits default's SimCLR view, and the paper's (CIFAR-10)
DIGITS = dict(crop_scale=(0.6, 1.0), flip_p=0.0, jitter=(0.4, 0.4, 0.0, 0.0), jitter_p=0.8, grayscale_p=0.0)
PAPER: dict = {}


def pil_draws(n: int, height: int, width: int, o: dict, seed: int = 0) -> np.ndarray:
    """``n`` parameter rows drawn as the PIL transform draws them (torchvision's own ``get_params`` and
    ``torch.rand`` calls, in build_transform's order), in the batched layout."""
    o = {**{"crop_scale": (0.2, 1.0), "flip_p": 0.5, "jitter": (0.4, 0.4, 0.4, 0.1), "jitter_p": 0.8,
            "grayscale_p": 0.2}, **o}
    torch.manual_seed(seed)
    img = torch.zeros(1, height, width, dtype=torch.uint8)
    cj = T.ColorJitter(*o["jitter"])
    rows = np.zeros((n, 15))
    for r in range(n):
        i, j, h, w = T.RandomResizedCrop.get_params(img, list(o["crop_scale"]), [3 / 4, 4 / 3])
        rows[r, [P_TOP, P_LEFT, P_H, P_W]] = i, j, h, w
        rows[r, P_FLIP] = float(torch.rand(1) < o["flip_p"])
        rows[r, P_ORDER] = range(4)
        rows[r, P_FACTORS] = (1.0, 1.0, 1.0, 0.0)
        if not o["jitter_p"] < torch.rand(1):
            order, b, c, s, hue = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
            rows[r, P_JITTER] = 1.0
            rows[r, P_ORDER] = order.numpy()
            rows[r, P_FACTORS] = [x if x is not None else d for x, d in zip((b, c, s, hue), (1, 1, 1, 0))]
        rows[r, P_GRAY] = float(torch.rand(1) < o["grayscale_p"])
    return rows


def batched_draws(n: int, height: int, width: int, o: dict, seed: int = 0, epoch: int = 0) -> np.ndarray:
    v = SimCLRViews(8, [0.5], [0.5], seed=seed, **o)
    keys = torch.stack([torch.full((n,), epoch), torch.arange(n)], dim=1)
    return v.params(keys, height, width).numpy()


def pil_flip_jitter(out: Image.Image, p: np.ndarray, jitter) -> Image.Image:
    """The flip and the colour jitter of the parameter row ``p`` with torchvision's PIL ops, in the
    row's order; an operation whose range is off (``jitter[k]`` 0) is skipped, as ColorJitter does."""
    if p[P_FLIP]:
        out = TF.hflip(out)
    if p[P_JITTER]:
        fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for k in p[P_ORDER].astype(int):
            if jitter[k]:
                out = fns[k](out, float(p[P_FACTORS][k]))
    return out


def pil_view(img: Image.Image, p: np.ndarray, size: int, o: dict, mean, std) -> torch.Tensor:
    """Reference: torchvision's PIL ops applied with the parameter row ``p`` (what build_transform's
    simclr pipeline does once its parameters are drawn)."""
    out = TF.resized_crop(img, int(p[P_TOP]), int(p[P_LEFT]), int(p[P_H]), int(p[P_W]), [size, size],
                          T.InterpolationMode.BILINEAR)
    out = pil_flip_jitter(out, p, o.get("jitter", (0.4, 0.4, 0.4, 0.1)))
    if p[P_GRAY]:
        out = TF.to_grayscale(out, num_output_channels=len(out.getbands()))
    return TF.normalize(TF.to_tensor(out), mean, std)


# ------------------------------------------------------------------------------ generator


def test_key_hash_is_derive_seed_elementwise() -> None:
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 2**31, 5)
    epochs = torch.as_tensor(rng.integers(0, 1000, 50))
    idx = torch.as_tensor(rng.integers(0, 10**7, 50))
    for s in seeds:
        got = _shr(key_hash(int(s), epochs, idx), 1).tolist()
        assert got == [derive_seed(int(s), int(e), int(i)) for e, i in zip(epochs, idx)]


def test_views_depend_on_seed_epoch_index_and_view_only() -> None:
    info = get_info("digits", "data")
    base = [(Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8), "L"), 0)
            for i in range(6)]
    raw = SeededItems(RawImages(base), seed=3)
    v = [simclr_views(info, seed=3, view=k) for k in range(2)]

    def batch(keys):
        items = [raw[k][0] for k in keys]
        return {"image": torch.stack([x["image"] for x in items]), "key": torch.stack([x["key"] for x in items])}

    full = apply_views(v, batch([(2, i) for i in range(6)]))
    alone = apply_views(v, batch([(2, 4), (2, 1)]))
    assert torch.equal(full[4], alone[0]) and torch.equal(full[1], alone[1])  # batch composition is irrelevant
    assert not torch.equal(full[:, 0], full[:, 1])  # the two views differ
    assert not torch.equal(full, apply_views(v, batch([(3, i) for i in range(6)])))  # the epoch matters
    other = [simclr_views(info, seed=4, view=k) for k in range(2)]
    assert not torch.equal(full, apply_views(other, batch([(2, i) for i in range(6)])))  # the seed matters


# ------------------------------------------------------------------------------ distributions


@pytest.mark.parametrize("height,width,o", [(8, 8, DIGITS), (32, 32, PAPER), (96, 64, dict(crop_scale=(0.08, 1.0)))],
                         ids=["digits", "cifar-paper", "tall-imagenet-scale"])
def test_parameter_distributions_match_the_pil_path(height: int, width: int, o: dict) -> None:
    a = pil_draws(N_DRAWS, height, width, o)
    b = batched_draws(N_DRAWS, height, width, o)
    alpha = 1e-3
    # the crop box: area fraction, aspect ratio, position (discrete: chi-square on the joint (h, w) counts)
    for name, fa, fb in [("area", a[:, P_H] * a[:, P_W], b[:, P_H] * b[:, P_W]),
                         ("aspect", a[:, P_W] / a[:, P_H], b[:, P_W] / b[:, P_H]),
                         ("top", a[:, P_TOP], b[:, P_TOP]), ("left", a[:, P_LEFT], b[:, P_LEFT])]:
        assert stats.ks_2samp(fa, fb).pvalue > alpha, name
    hw_a = {k: 0 for k in set(map(tuple, a[:, [P_H, P_W]])) | set(map(tuple, b[:, [P_H, P_W]]))}
    hw_b = dict(hw_a)
    for k in map(tuple, a[:, [P_H, P_W]]):
        hw_a[k] += 1
    for k in map(tuple, b[:, [P_H, P_W]]):
        hw_b[k] += 1
    keys = [k for k in hw_a if hw_a[k] + hw_b[k] >= 10]
    table = np.array([[hw_a[k] for k in keys], [hw_b[k] for k in keys]])
    assert stats.chi2_contingency(table).pvalue > alpha
    assert b[:, P_H].min() >= 1 and (b[:, P_TOP] + b[:, P_H]).max() <= height
    assert (b[:, P_LEFT] + b[:, P_W]).max() <= width
    # rates: flip, jitter applied, grayscale (two-proportion tests)
    for col in (P_FLIP, P_JITTER, P_GRAY):
        ka, kb = a[:, col].sum(), b[:, col].sum()
        if ka == kb == 0 or ka == kb == N_DRAWS:
            continue
        assert stats.chi2_contingency([[ka, N_DRAWS - ka], [kb, N_DRAWS - kb]]).pvalue > alpha, col
    # jitter factors (where applied) and the order of the four operations (24 permutations)
    ja, jb = a[a[:, P_JITTER] > 0], b[b[:, P_JITTER] > 0]
    for k in range(4):
        fa, fb = ja[:, P_FACTORS.start + k], jb[:, P_FACTORS.start + k]
        if np.ptp(fa) == 0:
            assert np.ptp(fb) == 0 and fa[0] == fb[0]  # an operation that is off stays neutral
        else:
            assert stats.ks_2samp(fa, fb).pvalue > alpha, f"factor {k}"
            assert fb.min() >= fa.min() - 0.01 and fb.max() <= fa.max() + 0.01
    perms = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    ca = np.bincount([perms[tuple(r)] for r in ja[:, P_ORDER].astype(int)], minlength=24)
    cb = np.bincount([perms[tuple(r)] for r in jb[:, P_ORDER].astype(int)], minlength=24)
    assert stats.chi2_contingency([ca, cb]).pvalue > alpha


def test_pil_reference_draws_are_the_pil_transform() -> None:
    """The reference above draws in the real transform's order: with the same seed, applying its
    parameters with the PIL ops gives the real transform's output exactly."""
    info = get_info("cifar10", "data")
    rng = np.random.default_rng(1)
    t = build_transform("simclr", info)
    for s in range(20):
        img = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))
        p = pil_draws(1, 32, 32, {}, seed=s)[0]
        torch.manual_seed(s)
        assert torch.equal(t(img), pil_view(img, p, 32, {}, info.mean, info.std))


# ------------------------------------------------------------------------------ pixels

# grey levels (of 255), max and 99th percentile: each step is rounded to 8 bits as PIL stores it, but
# PIL computes in fixed point (contrast blends with the rounded mean of its own 8-bit luma), so chained
# colour steps drift by a few levels; hue goes through PIL's 8-bit HSV, whose quantisation shows in
# saturated colours
TOL = {"digits": (4.0, 2.0), "cifar-no-hue": (8.0, 3.0), "cifar-paper": (24.0, 6.0), "flip-gray": (1.0, 1.0)}


def _smooth_rgb(rng: np.random.Generator, size: int) -> Image.Image:
    coarse = np.kron(rng.random((size // 4, size // 4, 3)) * 255, np.ones((4, 4, 1)))
    return Image.fromarray(np.clip(coarse + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("case", ["digits", "cifar-no-hue", "cifar-paper", "flip-gray"])
def test_pixels_match_the_pil_ops_for_fixed_parameters(case: str) -> None:
    rng = np.random.default_rng(2)
    if case == "digits":
        info, o = get_info("digits", "data"), DIGITS
        imgs = [img for img, _ in build_dataset("digits", "data", "train")][:300]
    else:
        info = get_info("cifar10", "data")
        o = {"cifar-no-hue": dict(jitter=(0.4, 0.4, 0.4, 0.0)), "cifar-paper": {},
             "flip-gray": dict(flip_p=0.7, grayscale_p=0.7, jitter_p=0.0)}[case]
        imgs = [_smooth_rgb(rng, 32) for _ in range(300)]
    v = simclr_views(info, seed=5, **o)
    x = torch.stack([TF.pil_to_tensor(im) for im in imgs])
    keys = torch.stack([torch.zeros(len(imgs), dtype=torch.long), torch.arange(len(imgs))], dim=1)
    params = v.params(keys, x.shape[-2], x.shape[-1])
    got = v.apply(x, params)
    want = torch.stack([pil_view(im, p, info.crop_size, o, info.mean, info.std) for im, p in zip(imgs, params.numpy())])
    diff = ((got - want) * torch.tensor(info.std).view(1, -1, 1, 1) * 255).abs()
    worst, p99 = TOL[case]
    assert diff.max() <= worst + 1e-3, f"{diff.max():.2f} grey levels"
    assert diff.flatten().quantile(0.99) <= p99 + 1e-3
    assert diff.mean() < 1.5


def kornia_slots(v: SimCLRViews, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Reference for :meth:`SimCLRViews.color`: Kornia's four colour functions applied one after
    another in each slot, every image with its own factor where the slot's operation is its own and
    the neutral factor elsewhere, then rounded to the 8-bit grid."""
    from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                                adjust_hue, adjust_saturation_with_gray_subtraction)

    applied, order, f = p[:, P_JITTER] > 0.5, p[:, P_ORDER].long(), p[:, P_FACTORS].float()
    rgb = x.shape[1] == 3
    for slot in range(4):
        mine = [applied & (order[:, slot] == k) for k in range(4)]
        x = adjust_brightness_accumulative(x, torch.where(mine[0], f[:, 0], 1.0))
        x = adjust_contrast_with_mean_subtraction(x, torch.where(mine[1], f[:, 1], 1.0))
        if rgb:
            x = adjust_saturation_with_gray_subtraction(x, torch.where(mine[2], f[:, 2], 1.0))
            shift = torch.where(mine[3], torch.trunc(f[:, 3] * 255) / 255, 0.0)
            x = torch.where(mine[3].view(-1, 1, 1, 1), adjust_hue(x, shift * 2 * torch.pi), x)
        x = torch.round(x * 255) / 255
    return x


@pytest.mark.parametrize("channels,jitter,jitter_p,n", [
    (3, (0.4, 0.4, 0.4, 0.1), 0.8, 64), (3, (0.8, 0.8, 0.8, 0.5), 1.0, 200), (3, (0.4, 0.0, 0.4, 0.0), 0.8, 33),
    (1, (0.4, 0.4, 0.0, 0.0), 0.8, 100), (1, (0.9, 0.2, 0.0, 0.0), 1.0, 17)])
def test_fused_colour_equals_kornias_operations_slot_by_slot(channels: int, jitter, jitter_p: float, n: int) -> None:
    v = SimCLRViews(16, [0.5] * channels, [0.5] * channels, jitter=jitter, jitter_p=jitter_p, seed=n)
    g = torch.Generator().manual_seed(n)
    x = torch.round(torch.rand(n, channels, 16, 16, generator=g) * 255) / 255
    x[: n // 8] = x[: n // 8, :1]  # grey pixels, whose hue is undefined
    p = v.params(torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], dim=1), 16, 16)
    got, want = v.color(x, p), kornia_slots(v, x, p)
    diff = (got - want).abs() * 255
    # the same float operations, except hue's closed form: at most a rare rounding tie on the 8-bit grid
    assert diff.max() <= 1 + 1e-4
    assert (diff > 1e-4).float().mean() < 1e-3
    assert not torch.equal(got, x)


@pytest.mark.parametrize("shape,scale", [((5, 3, 7, 9), 0.5), ((40, 3, 4, 4), 0.1), ((2, 3, 32, 32), 1.0)])
def test_hue_shift_is_kornias_hsv_round_trip(shape: tuple, scale: float) -> None:
    from kornia.enhance import adjust_hue

    g = torch.Generator().manual_seed(shape[0])
    x = torch.rand(*shape, generator=g)
    x[0, 1] = x[0, 0]                       # ties for the largest channel (red = green)
    x[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # pure red, at the wrap-around of the hue circle
    x[-1] = x[-1, 2:3]                      # grey
    shift = (torch.rand(shape[0], generator=g) * 2 - 1) * scale
    got = hue_shift(x, shift)
    assert torch.allclose(got, adjust_hue(x, shift * 2 * torch.pi), atol=2e-5)
    assert torch.allclose(hue_shift(x, torch.zeros(shape[0])), x, atol=2e-6)
    assert torch.allclose(got[-1], x[-1])  # grey stays grey


def test_steps_leave_their_inputs_unchanged() -> None:
    """The colour, grayscale and crop steps work in place on their own intermediate tensors only."""
    info = get_info("cifar10", "data")
    v = simclr_views(info, seed=1, grayscale_p=0.5)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    p = v.params(torch.stack([torch.zeros(40, dtype=torch.long), torch.arange(40)], dim=1), 32, 32)
    x = images.float() / 255
    kept = (images.clone(), x.clone())
    for step in (v.resized_crop, v.color, v.grayscale):
        assert not torch.equal(step(x, p), x)
        assert torch.equal(x, kept[1])
    out = v.apply(images, p)
    assert torch.equal(images, kept[0])
    # a channels-last batch (a permuted HWC array) gives the same views
    assert torch.equal(v.apply(images.to(memory_format=torch.channels_last), p), out)


def test_bad_input_is_refused() -> None:
    v = SimCLRViews(8, [0.5], [0.5])
    with pytest.raises(NcdError, match="uint8"):
        v.apply(torch.zeros(2, 1, 8, 8), torch.zeros(2, 15, dtype=torch.float64))
    with pytest.raises(NcdError, match="resize"):
        simclr_views(get_info("digits", "data"), resize=16)
