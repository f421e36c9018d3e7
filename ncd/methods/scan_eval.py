"""SCAN's evaluation (METHODS.md 1.7): weighted kNN of the pretext features (``pretrain``) and the Hungarian
protocol of the clustering heads (``scan``, ``selflabel``). Kept apart from the training modules
(:mod:`ncd.methods.simclr`, :mod:`ncd.methods.scan`, :mod:`ncd.methods.selflabel`) so that an evaluate
job imports no Lightning."""

from __future__ import annotations

import torch

from ncd.data import get_info
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


def evaluate_pretrain(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict]:
    """Weighted kNN top-1 (``evaluate.knn_k``, ``knn_sigma``) of the pretext features, the train
    split as the bank."""
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    model, names, ev = restore(blob, device), split_names(info), ctx.cfg["evaluate"]
    bank, bank_y = collect(model, eval_loader(ctx, info, names["train"]), device, "embed train")
    rows: list[Row] = []
    for split in eval_splits(ctx):
        feats, y = (bank, bank_y) if split == "train" else \
            collect(model, eval_loader(ctx, info, names[split]), device, f"embed {split}")
        res = weighted_knn(bank, bank_y, feats, y, info.num_classes, k=min(int(ev["knn_k"]), len(bank)),
                           sigma=float(ev["knn_sigma"]))
        rows.append((split, "best", "knn_top1", float(res["top1"])))
    return rows, {}


def evaluate_clustering(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict]:
    """SCAN's protocol for a clustering model (scan and selflabel): per head, Hungarian ACC, NMI, ARI
    and top-5 ACC; ``best`` = the head the stage selected; the best head's test confusion."""
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    model, names = restore(blob, device), split_names(info)
    best = int(blob["meta"].get("best_head", 0))
    rows: list[Row] = []
    confusion: dict = {}
    for split in eval_splits(ctx):
        logits, y = collect(model, eval_loader(ctx, info, names[split]), device, f"predict {split}")
        probs = torch.softmax(logits, -1)
        results = [hungarian_evaluate(p.argmax(1), y, p, return_reordered=True) for p in probs]
        rows += head_rows(split, results, ("acc", "nmi", "ari", "acc_top5"), best)
        if split == "test" and best < len(results):
            confusion = confusion_of(results[best], best)
    return rows, confusion


__all__ = ["evaluate_clustering", "evaluate_pretrain"]
