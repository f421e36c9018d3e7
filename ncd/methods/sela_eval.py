"""SeLa's evaluation rows (METHODS.md 2.6) and its augmentations (METHODS.md 2.4), shared with the
training stage (:mod:`ncd.methods.sela`). No Lightning at import: an evaluate job imports it only for
the linear probe, which trains (``sela.linear_probe.enabled``), and only then."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ncd.data import build_dataset, get_info
from ncd.data.batched import SimCLRViews
from ncd.data.transforms import eval_transform
from ncd.errors import NcdError
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.knn import weighted_knn
from ncd.eval.metrics import clustering_metrics
from ncd.eval.rows import Row, confusion_of, head_rows, selected_on_test
from ncd.methods.common import RunContext, collect, eval_loader, eval_splits, restore
from ncd.models.sela import SeLaModel

# --------------------------------------------------------------------------------- augmentation
#: SeLa's training augmentations (METHODS.md 2.4). ``grayscale_first``: ImageNet's ``--augs 3`` applies
#: RandomGrayscale before ColorJitter, the CIFAR script after it. ColorJitter is always applied.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"resize": 0, "crop_size": 224, "crop_scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4),
                 "jitter_p": 1.0, "grayscale_p": 0.2, "grayscale_first": True, "flip_p": 0.5, "eval_resize": 256},
    "cifar": {"resize": 256, "crop_size": 224, "crop_scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4),
              "jitter_p": 1.0, "grayscale_p": 0.2, "grayscale_first": False, "flip_p": 0.5, "eval_resize": 256},
}


def _preset_options(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if preset not in AUGMENT_PRESETS:
        raise NcdError(f"unknown SeLa augment preset {preset!r}; expected one of {', '.join(AUGMENT_PRESETS)}")
    unknown = sorted(set(overrides) - set(AUGMENT_PRESETS[preset]))
    if unknown:
        raise NcdError(f"unknown SeLa augment option(s) {', '.join(unknown)}; expected: {', '.join(AUGMENT_PRESETS[preset])}")
    return {**AUGMENT_PRESETS[preset], **overrides}


def sela_transform(kind: str, info, preset: str = "imagenet", **overrides: Any):
    """SeLa's ``train`` or ``val`` transform for ``info``'s images (preset + overrides).

    train: [Resize(resize)] → RandomResizedCrop(crop_size, crop_scale) → RandomGrayscale / ColorJitter
    (order by ``grayscale_first``) → horizontal flip → ToTensor → Normalize(dataset mean/std).
    val: [Resize(eval_resize)] → CenterCrop(crop_size) → ToTensor → Normalize.
    """
    o = _preset_options(preset, overrides)
    crop = int(o["crop_size"] or info.crop_size)
    if kind == "val":
        return eval_transform(crop, info.mean, info.std, resize=o["eval_resize"])
    if kind != "train":
        raise NcdError(f"unknown SeLa transform kind {kind!r}; expected 'train' or 'val'")
    from torchvision import transforms as T  # here: an evaluate job needs only the val transform

    norm = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    gray = T.RandomGrayscale(o["grayscale_p"])
    jitter = T.RandomApply([T.ColorJitter(*o["jitter"])], p=o["jitter_p"])
    return T.Compose([
        *([T.Resize(o["resize"])] if o["resize"] else []),
        T.RandomResizedCrop(crop, scale=tuple(o["crop_scale"])),
        *((gray, jitter) if o["grayscale_first"] else (jitter, gray)),
        T.RandomHorizontalFlip(o["flip_p"]),
        *norm,
    ])


def sela_views(info, preset: str = "imagenet", seed: int = 0, view: int = 0, **overrides: Any):
    """The batched counterpart (``augment.backend: batched``) of ``sela_transform("train", info, preset,
    **overrides)``, drawing from ``(seed, epoch, index, view)``; no resize first (``resize: 0``)."""
    o = _preset_options(preset, overrides)
    if o["resize"]:
        raise NcdError(f"augment.backend 'batched' does not resize first (sela.augment.resize: {o['resize']}); "
                       "expected resize: 0, or backend: pil")
    return SimCLRViews(int(o["crop_size"] or info.crop_size), info.mean, info.std, crop_scale=tuple(o["crop_scale"]),
                       flip_p=o["flip_p"], jitter=o["jitter"], jitter_p=o["jitter_p"], grayscale_p=o["grayscale_p"],
                       grayscale_first=bool(o["grayscale_first"]), seed=seed, view=view)


def _augment(ctx: RunContext) -> tuple[str, dict[str, Any]]:
    """The experiment's ``sela.augment``: its preset and its overrides."""
    aug = dict(ctx.cfg["sela"].get("augment", {}))
    return aug.pop("preset", "imagenet"), aug


def _views(ctx: RunContext, info, view: int):
    preset, aug = _augment(ctx)
    return sela_views(info, preset, seed=ctx.seed, view=view, **aug)


def _transform(ctx: RunContext, info, kind: str):
    preset, aug = _augment(ctx)
    return sela_transform(kind, info, preset, **aug)


# ------------------------------------------------------------------------------------ evaluation
def _knn_features(train: torch.Tensor, test: torch.Tensor, pca: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features for the kNN, optionally after PCA fitted on the train features (SeLa's
    CIFAR report uses 128 components)."""
    if pca:
        from sklearn.decomposition import PCA  # lazily: only a PCA'd kNN needs it

        p = PCA(n_components=min(pca, train.shape[0], train.shape[1]), whiten=False).fit(train.numpy())
        train, test = torch.from_numpy(p.transform(train.numpy())), torch.from_numpy(p.transform(test.numpy()))
    return F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)


def evaluate_sela(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict]:
    """SeLa's metrics rows ``(split, head, metric, value)`` and the best head's test confusion matrix.

    * test: every head's argmax on the test images (SeLa's val transform) against the classes:
      ``acc`` (Hungarian, see :func:`ncd.eval.metrics.clustering_metrics`), ``nmi``, ``ami``, ``ari``.
    * train: the self-labels of the label matrix against the train classes (what SeLa's README reports
      for ImageNet: the pseudo-labels, not the heads' predictions).
    * test, head best: ``knn_top1`` (weighted kNN on the L2-normalised penultimate features, bank = train
      split) and ``linear_top1`` (a linear probe on the frozen penultimate features) when enabled.
    * test, head best: ``knn_top1_selected_on_test``, the kNN of the best epoch of the training stage's
      kNN monitor (``knn_monitor``; cifar.py reports this one), when the checkpoint carries it.
    """
    sc, ev = ctx.cfg["sela"], ctx.cfg["evaluate"]
    model: SeLaModel = restore(blob, device)
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    batch_size = int(ev["batch_size"])
    matching = sc.get("acc_matching", "hungarian")
    best = int(blob["meta"].get("best_head", 0))
    dataset = ctx.cfg["dataset"]
    tf = _transform(ctx, info, "val")
    rows: list[Row] = []
    confusion: dict[str, Any] = {}
    metrics = ("acc", "nmi", "ami", "ari")

    def outputs(split: str, heads: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Penultimate features (and, with ``heads``, every head's predicted cluster) of a split."""
        def fn(x: torch.Tensor) -> torch.Tensor:
            f, logits = model.features_and_logits(x)
            return torch.cat([f, logits.argmax(2).t().to(f.dtype)], 1) if heads else f

        out, y = collect(fn, eval_loader(ctx, info, split, tf, batch_size), device, f"predict {split}")
        feats = out[:, :model.backbone_dim]
        preds = out[:, model.backbone_dim:].round().long().t() if heads else None  # [H, N]
        return feats, preds, y

    train_base = build_dataset(dataset, ctx.data_root, info.train_split)
    train_y = torch.as_tensor(np.asarray(train_base.targets))
    labels = model.labels.cpu()
    if labels.shape[1] != len(train_y):
        raise NcdError(f"the label matrix has {labels.shape[1]} columns but the train split has {len(train_y)} images")
    rows += head_rows("train", [clustering_metrics(labels[h], train_y, matching) for h in range(model.num_heads)],
                      metrics, best)
    if "test" not in eval_splits(ctx):
        return rows, confusion
    feats_te, preds_te, y_te = outputs(info.test_split, heads=True)
    rows += head_rows("test", [clustering_metrics(preds_te[h], y_te, matching) for h in range(model.num_heads)],
                      metrics, best)
    if best < model.num_heads and model.num_clusters == info.num_classes:
        confusion = confusion_of(hungarian_evaluate(preds_te[best], y_te, return_reordered=True), best)
    feats_tr, _, y_tr = outputs(info.train_split, heads=False)
    k = int(ev["knn_k"])
    a, b = _knn_features(feats_tr, feats_te, int(sc.get("knn_pca", 0)))
    # on the inference device: at ImageNet scale the test x train similarities are the heavy part
    knn = weighted_knn(a.to(device), y_tr, b.to(device), y_te, info.num_classes, k=min(k, len(a)),
                       sigma=float(ev["knn_sigma"]))
    rows.append(("test", "best", "knn_top1", float(knn["top1"])))
    monitor = blob["meta"].get("knn_monitor")
    if monitor:
        # cifar.py's reported number: the kNN of the epoch with the best test kNN (selected on the test split)
        rows.append(("test", "best", selected_on_test("knn_top1"), float(monitor["best_top1"])))
    lp = sc.get("linear_probe", {})
    if lp.get("enabled", True):
        # lazily: the probe trains, with Lightning
        from ncd.eval.linear_probe import linear_probe

        opts = {key: v for key, v in lp.items() if key != "enabled"}
        res = linear_probe(feats_tr, y_tr, feats_te, y_te, info.num_classes, seed=ctx.seed,
                           accelerator="gpu" if device.type == "cuda" else "cpu", **opts)
        rows.append(("test", "best", "linear_top1", float(res["top1"])))
    return rows, confusion


__all__ = ["AUGMENT_PRESETS", "evaluate_sela", "sela_transform"]
