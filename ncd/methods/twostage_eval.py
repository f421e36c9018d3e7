"""The evaluation of both stages of the two-stage classifier (METHODS.md 6) and what it shares with
their training modules (:mod:`ncd.methods.superand`, :mod:`ncd.methods.twostage`): the official test
transform, the memory-bank kNN monitor and stage 2's split. No Lightning here, so that an evaluate job
starts without it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ncd.data import build_dataset, get_info
from ncd.data.transforms import CenterCropNormalize
from ncd.errors import NcdError
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.knn import weighted_knn
from ncd.eval.rows import Row, confusion_of, head_rows
from ncd.methods.common import (
    RunContext,
    collect,
    eval_loader,
    eval_splits,
    restore,
    split_names,
)


def _renormalize(t: Callable, norm: dict[str, Any] | None) -> Callable:
    """Replace the dataset's normalisation constants by the official code's, where it has its own
    (its CIFAR-100 std (0.2009, 0.1984, 0.2023) differs from the usual one)."""
    if not norm or norm.get("mean") is None:
        return t
    if isinstance(t, CenterCropNormalize):
        t.mean, t.std = list(norm["mean"]), list(norm["std"])
        return t
    from torchvision import transforms as T

    for op in t.transforms:
        if isinstance(op, T.Normalize):
            op.mean, op.std = list(norm["mean"]), list(norm["std"])
    return t


def eval_transform(ctx: RunContext, info):
    """The official test transform: centre crop (a no-op at the training size) and normalisation."""
    return _renormalize(ctx.transform("val", info), ctx.cfg.get("superand", {}).get("normalize"))


def knn_monitor(memory: torch.Tensor, train_labels: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                num_classes: int, k: int = 200, sigma: float = 0.1) -> float:
    """Weighted kNN top-1 of ``feats`` against the memory bank's labelled rows (the official monitor
    does not recompute the training features)."""
    keep = train_labels >= 0
    if not bool(keep.any()):
        raise NcdError("the Super-AND kNN monitor needs labelled training images; the stage-1 split has none")
    bank = memory[keep]
    return float(weighted_knn(bank, train_labels[keep], feats.to(bank.device), labels, num_classes,
                              k=min(int(k), bank.shape[0]), sigma=sigma)["top1"])


def stage2_split(ctx: RunContext, info) -> str:
    """Stage 2's training split, also the one its ``train`` metrics are scored on: ``twostage.split``,
    else the dataset's train split (STL-10 in the paper: ``train+test``, the 13,000 labelled images)."""
    return ctx.cfg.get("twostage", {}).get("split") or info.train_split


def evaluate_twostage(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict]:
    """Metrics rows ``(split, head, metric, value)`` and a confusion matrix for either stage.

    superand: weighted kNN top-1 (k, σ of the stage-1 config) of the test split's embeddings against
    the memory bank's labelled rows, the official monitor (whatever ``splits`` says).
    twostage: per split (``train`` = the split stage 2 trained on, the paper's protocol: STL-10's
    13,000 labelled images with ``split: train+test``; ``test`` = the test split), per head: Hungarian accuracy
    (SCAN's ``hungarian_evaluate``; C × C votes, as the official ``protocols.test``), NMI and ARI;
    ``best`` = the head with the lowest training loss, ``avg`` = mean over heads.
    """
    model, arch = restore(blob, device), blob["arch"]
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    t = eval_transform(ctx, info)

    def loader(split: str):
        return eval_loader(ctx, info, split, t)

    if arch["kind"] == "superand":
        sc = ctx.cfg.get("superand", {})
        labels = torch.as_tensor(build_dataset(dataset, ctx.data_root, arch["split"]).targets, dtype=torch.long)
        feats, y = collect(model, loader(info.test_split), device, "embed test")
        knn = knn_monitor(model.memory.cpu(), labels, feats, y, info.num_classes, int(sc.get("knn_k", 200)),
                          float(sc.get("knn_sigma", 0.1)))
        return [("test", "best", "knn_top1", knn)], {}

    best = int(blob["meta"].get("best_head", 0))
    names = {**split_names(info), "train": arch.get("split") or stage2_split(ctx, info)}
    rows: list[Row] = []
    confusion: dict[str, Any] = {}
    for split in eval_splits(ctx):
        probs, y = collect(model, loader(names[split]), device, f"predict {split}")
        results = [hungarian_evaluate(p.argmax(1), y, return_reordered=True) for p in probs]
        rows += head_rows(split, results, ("acc", "nmi", "ari"), best, avg=True)
        if best < len(results) and (split == "train" or not confusion):
            confusion = confusion_of(results[best], best, split=split)
    return rows, confusion


__all__ = ["eval_transform", "evaluate_twostage", "knn_monitor", "stage2_split"]
