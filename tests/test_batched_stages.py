"""The batched views of SeLa, CLD and the two-stage classifier (``augment.backend: batched``) make the
augmentation their PIL transforms make: the same crop scale, flip, jitter ranges and probabilities,
grayscale and normalisation, read off the PIL ``Compose`` each stage builds; SeLa's ImageNet order
(grayscale before colour jitter) matches the PIL ops pixel for pixel within a few grey levels; and the
kinds without a batched path are refused with a clear error. (The parameter distributions and pixels of
the shared view are tested in tests/test_batched_augment.py; resume and the PIL difference per stage in
tests/test_stages.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ncd.data.batched import P_FACTORS, P_FLIP, P_GRAY, P_H, P_JITTER, P_LEFT, P_ORDER, P_TOP, P_W, SimCLRViews
from ncd.data.cld import build_cld_transform, build_cld_views
from ncd.data.registry import get_info
from ncd.errors import NcdError
from ncd.methods.sela_eval import sela_transform, sela_views
from ncd.methods.superand import SAND_AUGMENT

DIGITS_AUG = {"crop_scale": (0.6, 1.0), "jitter": (0.4, 0.4, 0.0, 0.0), "flip_p": 0.0, "grayscale_p": 0.0}


def pil_options(t: T.Compose) -> dict:
    """What a PIL training Compose does, in SimCLRViews' terms; ``grayscale_first`` from the order."""
    o = {"flip_p": 0.0, "jitter_p": 0.0, "jitter": None, "grayscale_p": 0.0, "grayscale_first": False}
    seen_jitter = False
    for step in t.transforms:
        p = 1.0
        if isinstance(step, T.RandomApply):
            assert len(step.transforms) == 1
            p, step = step.p, step.transforms[0]
        if isinstance(step, T.RandomResizedCrop):
            o["size"], o["scale"] = step.size[0], tuple(step.scale)
        elif isinstance(step, T.RandomHorizontalFlip):
            o["flip_p"] = p * step.p
        elif isinstance(step, T.ColorJitter):
            o["jitter_p"], o["jitter"], seen_jitter = p, (step.brightness, step.contrast, step.saturation, step.hue), True
        elif isinstance(step, T.RandomGrayscale):
            o["grayscale_p"], o["grayscale_first"] = p * step.p, not seen_jitter
        elif isinstance(step, T.Normalize):
            o["mean"], o["std"] = tuple(step.mean), tuple(step.std)
        else:
            assert isinstance(step, T.ToTensor), f"a step the batched path does not make: {step}"
    return o


def views_options(v: SimCLRViews) -> dict:
    return {"size": v.size, "scale": v.scale, "flip_p": v.flip_p, "jitter_p": v.jitter_p, "jitter": v.ranges,
            "grayscale_p": v.grayscale_p, "grayscale_first": v.grayscale_first,
            "mean": tuple(v.mean.flatten().tolist()), "std": tuple(v.std.flatten().tolist())}


def _same(pil: dict, batched: dict) -> None:
    if pil["grayscale_p"] == 0:  # the order of a grayscale that never happens does not matter
        pil, batched = {**pil, "grayscale_first": None}, {**batched, "grayscale_first": None}
    assert set(pil) == set(batched)
    for k in pil:
        a, b = pil[k], batched[k]
        if k in ("mean", "std"):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=k)
        else:
            assert a == b, f"{k}: PIL {a}, batched {b}"


@pytest.mark.parametrize("dataset,kind,aug", [("cifar10", "npid", {}), ("digits", "npid", DIGITS_AUG),
                                              ("cifar100", "npid", {"jitter_p": 0.5}),
                                              ("cifar10", "mocov2", {"blur_p": 0.0})])
def test_cld_views_are_the_cld_transform(dataset: str, kind: str, aug: dict) -> None:
    info = get_info(dataset, "data")
    _same(pil_options(build_cld_transform(kind, info, **aug)),
          views_options(build_cld_views(kind, info, seed=3, view=1, **aug)))


@pytest.mark.parametrize("dataset,aug", [
    ("cifar10", {"crop_size": 32, "eval_resize": 0}),  # the ImageNet order on CIFAR-sized images
    ("digits", {"crop_size": 8, "crop_scale": (0.3, 1.0), "jitter": (0.4, 0.4, 0.0, 0.0), "jitter_p": 0.8,
                "grayscale_p": 0.0, "flip_p": 0.0, "eval_resize": 0}),  # the embedded default's
    ("cifar10", {"crop_size": 32, "grayscale_first": False, "jitter_p": 0.7}),
])
def test_sela_views_are_the_sela_transform(dataset: str, aug: dict) -> None:
    info = get_info(dataset, "data")
    _same(pil_options(sela_transform("train", info, "imagenet", **aug)),
          views_options(sela_views(info, "imagenet", seed=1, view=0, **aug)))


def test_superand_views_are_the_superand_transform() -> None:
    """Super-AND and stage 2 use SCAN's simclr view with SAND_AUGMENT: the batched simclr view with the
    same options is checked against its PIL transform here."""
    from ncd.data import build_transform
    from ncd.data.batched import simclr_views

    info = get_info("cifar10", "data")
    pil = pil_options(build_transform("simclr", info, **SAND_AUGMENT))
    assert pil["jitter_p"] == 1.0 and pil["scale"] == (0.2, 1.0)
    _same(pil, views_options(simclr_views(info, **SAND_AUGMENT)))


def _pil_sela(imgs: list, params: torch.Tensor, gray_first: bool, info) -> torch.Tensor:
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out_all = []
    for im, p in zip(imgs, params.numpy()):
        out = TF.resized_crop(im, int(p[P_TOP]), int(p[P_LEFT]), int(p[P_H]), int(p[P_W]), [32, 32],
                              T.InterpolationMode.BILINEAR)
        if p[P_FLIP]:
            out = TF.hflip(out)
        if p[P_GRAY] and gray_first:
            out = TF.to_grayscale(out, num_output_channels=3)
        for k in p[P_ORDER].astype(int):
            if k < 3:
                out = fns[k](out, float(p[P_FACTORS][k]))
        if p[P_GRAY] and not gray_first:
            out = TF.to_grayscale(out, num_output_channels=3)
        out_all.append(TF.normalize(TF.to_tensor(out), info.mean, info.std))
    return torch.stack(out_all)


@pytest.mark.parametrize("gray_first", [True, False])
def test_grayscale_order_pixels_match_the_pil_ops(gray_first: bool) -> None:
    """SeLa's two orders (ImageNet: RandomGrayscale then ColorJitter; CIFAR: the reverse) for fixed
    parameters: the batched pixels equal torchvision's PIL ops in that order to within 8 grey levels
    (99 % within 3; the tolerance of the no-hue CIFAR case in test_batched_augment.py), and the other
    order is farther off (99th percentile above 10 levels), so the order is really applied."""
    rng = np.random.default_rng(4)
    imgs = [Image.fromarray(np.clip(np.kron(rng.random((8, 8, 3)) * 255, np.ones((4, 4, 1)))
                                    + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)) for _ in range(200)]
    info = get_info("cifar10", "data")
    v = sela_views(info, "imagenet", seed=2, crop_size=32, jitter=(0.4, 0.4, 0.4, 0.0), grayscale_p=0.5,
                   grayscale_first=gray_first)
    x = torch.stack([TF.pil_to_tensor(im) for im in imgs])
    keys = torch.stack([torch.zeros(len(imgs), dtype=torch.long), torch.arange(len(imgs))], dim=1)
    params = v.params(keys, 32, 32)
    assert 0.3 < float(params[:, P_GRAY].mean()) < 0.7 and float(params[:, P_JITTER].mean()) == 1.0
    got = v.apply(x, params)
    scale = torch.tensor(info.std).view(1, -1, 1, 1) * 255
    diff = ((got - _pil_sela(imgs, params, gray_first, info)) * scale).abs()
    assert diff.max() <= 8 + 1e-3, f"{diff.max():.2f} grey levels"
    assert diff.flatten().quantile(0.99) <= 3 + 1e-3
    other = ((got - _pil_sela(imgs, params, not gray_first, info)) * scale).abs()
    assert other.flatten().quantile(0.99) > 10


def test_kinds_without_a_batched_path_are_refused() -> None:
    info = get_info("cifar10", "data")
    with pytest.raises(NcdError, match="'infomin' has no batched path"):
        build_cld_views("infomin", info)
    with pytest.raises(NcdError, match="blur_p None"):
        build_cld_views("mocov2", info)
    with pytest.raises(NcdError, match="erasing True"):
        build_cld_views("mocov2", info, blur_p=0.0, erasing=True)
    with pytest.raises(NcdError, match="unknown option|not an option|unknown"):
        build_cld_views("npid", info, sharpness=1.0)
    with pytest.raises(NcdError, match=r"sela.augment.resize: 256"):
        sela_views(info, "cifar")
    with pytest.raises(NcdError, match="unknown SeLa augment option"):
        sela_views(info, "imagenet", blur=1)
