"""SCAN's "Pretext + K-means" baseline (SCAN, Table 3): k-means on the features of the pretext
(SimCLR) model, scored with SCAN's Hungarian protocol. It runs in every SCAN experiment, after
``pretrain``, and shows what the clustering stages add on top of the pretext features alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ncd.checkpoint import load_model, save_model
from ncd.data import get_info
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.rows import Row, confusion_of, head_rows
from ncd.methods.common import (
    RunContext,
    collect,
    eval_loader,
    eval_splits,
    inference_device,
    restore,
    split_names,
)

log = logging.getLogger("ncd")


def _features(ctx: RunContext, model: torch.nn.Module, info, split: str, device: torch.device):
    """L2-normalised pretext features of a split (val transform) and its targets."""
    fn = model if ctx.stage_cfg["features"] == "head" else (lambda x: F.normalize(model.backbone(x), dim=1))
    return collect(fn, eval_loader(ctx, info, split, batch_size=int(ctx.stage_cfg["batch_size"])), device,
                   f"embed {split}")


def run_pretext_kmeans(ctx: RunContext, pretrain_ckpt: Path, out: Path) -> None:
    """Fit k-means (``n_init`` restarts, seeded) on the train split's pretext features; write ``out``
    (model.ckpt: the pretext model and the centroids)."""
    from sklearn.cluster import KMeans  # lazily: evaluating the centroids needs no fitting

    sc = ctx.stage_cfg
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    device = inference_device(ctx.runtime)
    blob = load_model(pretrain_ckpt, expected={"kind": "contrastive"})
    blob["path"] = str(pretrain_ckpt)
    model = restore(blob, device)
    feats, _ = _features(ctx, model, info, info.train_split, device)
    k = int(sc["num_clusters"] or info.num_classes)
    log.info("k-means on the %s pretext features of %s/%s: %d × %d, k=%d", sc["features"], ctx.cfg["dataset"],
             info.train_split, *feats.shape, k)
    km = KMeans(n_clusters=k, n_init=int(sc["n_init"]), max_iter=int(sc["max_iter"]),
                random_state=ctx.seed).fit(feats.double().numpy())
    state = {**model.state_dict(), "centroids": torch.from_numpy(km.cluster_centers_.astype(np.float32))}
    save_model(out, state, {**blob["arch"], "features": sc["features"], "num_clusters": k},
               ctx.meta(best_head=0, inertia=float(km.inertia_)))


def evaluate_pretext_kmeans(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict]:
    """Hungarian ACC, NMI and ARI (SCAN's protocol) of each image's nearest centroid."""
    state = dict(blob["state_dict"])
    centroids = state.pop("centroids").double()
    model = restore({**blob, "state_dict": state}, device)
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    names = split_names(info)
    rows: list[Row] = []
    confusion: dict = {}
    for split in eval_splits(ctx):
        feats, y = _features(ctx, model, info, names[split], device)
        pred = torch.cdist(feats.double(), centroids).argmin(1)
        res = hungarian_evaluate(pred, y, return_reordered=True)
        rows += head_rows(split, [res], ("acc", "nmi", "ari"), best=0)
        if split == "test":
            confusion = confusion_of(res, 0)
    return rows, confusion


__all__ = ["run_pretext_kmeans", "evaluate_pretext_kmeans"]
