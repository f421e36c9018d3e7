"""UNO's batched crops (ncd.data.batched_uno) against the PIL transforms they replace
(ncd.data.uno.build_uno_transform, CIFAR-style pipeline):

* the options read off the PIL ``Compose`` are the batched view's;
* on 10,000 draws each random parameter (crop choice, padded-crop offset, resized-crop area and aspect
  ratio, flip, jitter applied and its factors, Solarize applied and its threshold, Equalize applied)
  follows the distribution of the PIL path's own draws (two-sample tests);
* for a fixed parameter set the pixels equal the PIL ops' within a stated number of grey levels.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ncd.data import build_dataset
from ncd.data.batched import NUM_PARAMS, P_FACTORS, P_FLIP, P_H, P_JITTER, P_LEFT, P_TOP, P_W
from ncd.data.batched_uno import U_CHOICE, U_EQ, U_LEFT, U_SOL, U_THR, U_TOP, UNOViews, build_uno_views
from ncd.data.registry import get_info
from ncd.data.uno import Equalize, Solarize, build_uno_transform
from ncd.errors import NcdError
from test_batched_augment import pil_flip_jitter  # same folder: pytest puts it on sys.path

N_DRAWS = 10_000
CASES = [("digits", "large", {"flip_p": 0.0}), ("digits", "small", {"flip_p": 0.0}),
         ("cifar10", "large", {}), ("cifar10", "small", {})]


def _steps(t: T.Compose) -> dict:
    """The PIL Compose's steps by role (unwrapping RandomApply: (p, step))."""
    out = {}
    for step in t.transforms:
        p = 1.0
        if isinstance(step, T.RandomApply):
            p, step = step.p, step.transforms[0]
        if isinstance(step, (T.RandomChoice, T.RandomResizedCrop)):
            out["crop"] = step
        elif isinstance(step, T.RandomHorizontalFlip):
            out["flip"] = step.p
        elif isinstance(step, T.ColorJitter):
            out["jitter"] = (p, step)
        elif isinstance(step, Solarize):
            out["solarize"] = p
        elif isinstance(step, Equalize):
            out["equalize"] = p
        elif isinstance(step, T.Normalize):
            out["norm"] = (tuple(step.mean), tuple(step.std))
        else:
            assert isinstance(step, T.ToTensor), f"a step the batched path does not make: {step}"
    return out


@pytest.mark.parametrize("dataset,kind,aug", CASES)
def test_options_are_the_pil_transforms(dataset: str, kind: str, aug: dict) -> None:
    info = get_info(dataset, "data")
    s = _steps(build_uno_transform(kind, info, **aug))
    v = build_uno_views(kind, info, **aug)
    if kind == "large":
        crop, rrc = s["crop"].transforms
        assert isinstance(crop, T.RandomCrop) and crop.size == (v.size, v.size) and crop.padding == v.padding
    else:
        rrc = s["crop"]
    assert rrc.size == (v.size, v.size) and tuple(rrc.scale) == v.rrc.scale and tuple(rrc.ratio) == v.rrc.ratio
    p, cj = s["jitter"]
    assert p == v.rrc.jitter_p and (cj.brightness, cj.contrast, cj.saturation, cj.hue) == v.rrc.ranges
    assert (s["flip"], s["solarize"], s["equalize"]) == (v.rrc.flip_p, v.solarize_p, v.equalize_p)
    np.testing.assert_allclose(s["norm"][0], v.rrc.mean.flatten().tolist(), rtol=1e-6)
    np.testing.assert_allclose(s["norm"][1], v.rrc.std.flatten().tolist(), rtol=1e-6)


def pil_draws(v: UNOViews, height: int, width: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` parameter rows drawn as the PIL Compose draws them (torchvision's ``get_params`` and
    ``torch.rand``, Python's ``random`` for RandomChoice and Solarize's threshold), in the batched layout."""
    torch.manual_seed(seed)
    random.seed(seed)
    img = torch.zeros(1, height, width)
    padded = torch.zeros(1, height + 2 * v.padding, width + 2 * v.padding)
    cj = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    rows = np.zeros((n, NUM_PARAMS + 6))
    for r in range(n):
        e = rows[r, NUM_PARAMS:]
        if v.kind == "large" and random.random() < 0.5:  # RandomChoice: random.choice of two
            e[U_CHOICE] = 1.0
            e[U_TOP], e[U_LEFT], _, _ = T.RandomCrop.get_params(padded, (v.size, v.size))
        else:
            i, j, h, w = T.RandomResizedCrop.get_params(img, list(v.rrc.scale), list(v.rrc.ratio))
            rows[r, [P_TOP, P_LEFT, P_H, P_W]] = i, j, h, w
        rows[r, P_FLIP] = float(torch.rand(1) < v.rrc.flip_p)
        rows[r, P_FACTORS] = (1.0, 1.0, 1.0, 0.0)
        if not v.rrc.jitter_p < torch.rand(1):
            _, b, c, s, hue = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
            rows[r, P_JITTER], rows[r, P_FACTORS] = 1.0, (b, c, s, hue)
        if not v.solarize_p < torch.rand(1):
            e[U_SOL], e[U_THR] = 1.0, random.uniform(0, 256)
        e[U_EQ] = float(not v.equalize_p < torch.rand(1))
    return rows


def _rate_close(a: np.ndarray, b: np.ndarray) -> None:
    pa, pb = a.mean(), b.mean()
    se = math.sqrt(max(pa * (1 - pa), pb * (1 - pb), 1e-4) * 2 / len(a))
    assert abs(pa - pb) < 5 * se, f"rates {pa:.4f} vs {pb:.4f}"


def _same_dist(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if len(a) < 50 or len(b) < 50:
        return
    p = stats.ks_2samp(a, b).pvalue if len(np.unique(np.concatenate([a, b]))) > 20 else _chi2(a, b)
    assert p > 1e-4, f"{what}: p = {p:.2e}"


def _chi2(a: np.ndarray, b: np.ndarray) -> float:
    vals = np.unique(np.concatenate([a, b]))
    table = np.array([[np.sum(a == x) for x in vals], [np.sum(b == x) for x in vals]])
    table = table[:, table.sum(0) >= 10]
    return 1.0 if table.shape[1] < 2 else stats.chi2_contingency(table)[1]


@pytest.mark.parametrize("dataset,kind,aug", CASES)
def test_parameter_distributions_match_the_pil_path(dataset: str, kind: str, aug: dict) -> None:
    info = get_info(dataset, "data")
    v = build_uno_views(kind, info, seed=11, view=1, **aug)
    h = w = info.image_size
    keys = torch.stack([torch.full((N_DRAWS,), 3), torch.arange(N_DRAWS)], dim=1)
    got = v.params(keys, h, w).numpy()
    want = pil_draws(v, h, w, N_DRAWS, seed=5)
    g, wt = got[:, NUM_PARAMS:], want[:, NUM_PARAMS:]
    for col in (U_CHOICE, U_SOL, U_EQ):
        _rate_close(g[:, col], wt[:, col])
    _rate_close(got[:, P_FLIP], want[:, P_FLIP])
    _rate_close(got[:, P_JITTER], want[:, P_JITTER])
    crop_g, crop_w = g[:, U_CHOICE] > 0.5, wt[:, U_CHOICE] > 0.5
    for col, what in ((U_TOP, "padded-crop top"), (U_LEFT, "padded-crop left")):
        _same_dist(g[crop_g, col], wt[crop_w, col], what)
    area_g = got[~crop_g, P_H] * got[~crop_g, P_W]
    area_w = want[~crop_w, P_H] * want[~crop_w, P_W]
    _same_dist(area_g, area_w, "resized-crop area")
    _same_dist(got[~crop_g, P_W] / got[~crop_g, P_H], want[~crop_w, P_W] / want[~crop_w, P_H], "aspect ratio")
    _same_dist(got[~crop_g, P_TOP], want[~crop_w, P_TOP], "resized-crop top")
    jg, jw = got[:, P_JITTER] > 0.5, want[:, P_JITTER] > 0.5
    for k, what in enumerate(("brightness", "contrast", "saturation", "hue")):
        _same_dist(got[jg, P_FACTORS.start + k], want[jw, P_FACTORS.start + k], what)
    _same_dist(g[g[:, U_SOL] > 0.5, U_THR], wt[wt[:, U_SOL] > 0.5, U_THR], "solarize threshold")


def pil_view(img: Image.Image, p: np.ndarray, v: UNOViews) -> torch.Tensor:
    """Reference: the PIL ops of build_uno_transform applied with the parameter row ``p``."""
    e = p[NUM_PARAMS:]
    if e[U_CHOICE]:
        out = TF.crop(TF.pad(img, v.padding), int(e[U_TOP]), int(e[U_LEFT]), v.size, v.size)
    else:
        out = TF.resized_crop(img, int(p[P_TOP]), int(p[P_LEFT]), int(p[P_H]), int(p[P_W]), [v.size, v.size],
                              T.InterpolationMode.BILINEAR)
    # a hue factor of 0 (set by the pixel test) is ColorJitter's "off": skipped, as the PIL range 0 is
    out = pil_flip_jitter(out, p, [1, 1, 1, float(p[P_FACTORS][3] != 0)])
    if e[U_SOL]:
        out = ImageOps.solarize(out, e[U_THR])
    if e[U_EQ]:
        out = ImageOps.equalize(out)
    return TF.normalize(TF.to_tensor(out), v.rrc.mean.flatten().tolist(), v.rrc.std.flatten().tolist())


# (max, 99th percentile) grey levels, outside the pixels that Solarize inverted on one path only. On
# colour images the hue shift is set to 0 in the fixed parameters: PIL's 8-bit HSV round trip and
# Kornia's float one differ by up to ~17 levels (tests/test_batched_augment.py, "cifar-paper"). Equalize
# remaps by the image's histogram: on colour images whose jittered range is narrow it stretches a
# one-level difference into tens of levels, so there it is left out of the pipeline here and checked on
# the same 8-bit input instead (test_equalize_and_solarize_equal_pils_on_the_same_input).
TOL = {"digits": (8.0, 3.0), "cifar10": (8.0, 3.0)}


@pytest.mark.parametrize("dataset,kind", [("digits", "large"), ("digits", "small"), ("cifar10", "large")])
def test_pixels_match_the_pil_ops_for_fixed_parameters(dataset: str, kind: str) -> None:
    rng = np.random.default_rng(3)
    info = get_info(dataset, "data")
    if dataset == "digits":
        imgs = [img for img, _ in build_dataset("digits", "data", "train")][:300]
    else:
        imgs = [Image.fromarray(np.clip(np.kron(rng.random((8, 8, 3)) * 255, np.ones((4, 4, 1)))
                                        + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8))
                for _ in range(300)]
    # every step more often than by default, so that each is exercised
    v = build_uno_views(kind, info, seed=7, jitter_p=0.8, solarize_p=0.5,
                        equalize_p=0.5 if dataset == "digits" else 0.0)
    x = torch.stack([TF.pil_to_tensor(im) for im in imgs])
    keys = torch.stack([torch.zeros(len(imgs), dtype=torch.long), torch.arange(len(imgs))], dim=1)
    params = v.params(keys, x.shape[-2], x.shape[-1])
    params[:, P_FACTORS.start + 3] = 0.0
    got = v.apply(x, params)
    want = torch.stack([pil_view(im, p, v) for im, p in zip(imgs, params.numpy())])
    std, mean = v.rrc.std.view(1, -1, 1, 1), v.rrc.mean.view(1, -1, 1, 1)
    g255, w255 = (got * std + mean) * 255, (want * std + mean) * 255
    diff = (g255 - w255).abs()
    worst, p99 = TOL[dataset]
    # a pixel a few levels apart before Solarize, on either side of the threshold, is inverted on one path
    # only: it then reads v on one and 255 − v' on the other (before an Equalize, which is 0 there)
    solarized = torch.as_tensor(params[:, NUM_PARAMS + U_SOL] > 0.5).view(-1, 1, 1, 1).expand_as(diff)
    straddle = solarized & ((g255 + w255 - 255).abs() <= worst + 1e-3)
    off = diff[~straddle]
    assert off.max() <= worst + 1e-3, f"{off.max():.2f} grey levels"
    assert diff.flatten().quantile(0.99) <= p99 + 1e-3, f"{diff.flatten().quantile(0.99):.2f}"
    assert float((diff > worst).float().mean()) < 0.01 and diff.mean() < 1.5


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
def test_equalize_and_solarize_equal_pils_on_the_same_input(dataset: str) -> None:
    """The two 8-bit steps after the jitter, given the same images: exactly PIL's ImageOps."""
    from ncd.data.batched_strong import apply_op_batch

    rng = np.random.default_rng(1)
    if dataset == "digits":
        imgs = [img for img, _ in build_dataset("digits", "data", "train")][:100]
    else:
        imgs = [Image.fromarray(np.clip(np.kron(rng.random((8, 8, 3)) * 120 + 60, np.ones((4, 4, 1)))
                                        + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8))
                for _ in range(100)]
    x = torch.stack([TF.pil_to_tensor(im) for im in imgs]).float()
    thr = torch.as_tensor(rng.uniform(0, 256, len(imgs)))
    eq = apply_op_batch(x, "Equalize", thr)
    sol = apply_op_batch(x, "Solarize", thr)
    for i, im in enumerate(imgs):
        assert torch.equal(eq[i].to(torch.uint8), TF.pil_to_tensor(ImageOps.equalize(im)))
        assert torch.equal(sol[i].to(torch.uint8), TF.pil_to_tensor(ImageOps.solarize(im, float(thr[i]))))


def test_views_are_keyed_and_imagenet_is_refused() -> None:
    info = get_info("digits", "data")
    x = torch.stack([TF.pil_to_tensor(img) for img, _ in build_dataset("digits", "data", "train")][:64])
    keys = torch.stack([torch.zeros(64, dtype=torch.long), torch.arange(64)], dim=1)
    a = build_uno_views("large", info, seed=1, view=0)
    assert torch.equal(a(x, keys), build_uno_views("large", info, seed=1, view=0)(x, keys))
    assert not torch.equal(a(x, keys), build_uno_views("large", info, seed=1, view=1)(x, keys))
    assert torch.equal(a(x[10:20], keys[10:20]), a(x, keys)[10:20])  # per image, whatever the batch
    assert build_uno_views("small", info)(x, keys).shape[-1] == round(8 * 18 / 32)
    with pytest.raises(NcdError, match="no batched path"):
        build_uno_views("large", get_info("imagenet-100", "data"))
    with pytest.raises(NcdError, match="uint8"):
        a(x.float(), keys)
