"""The floor of every table: k-means on raw pixels."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ncd.checkpoint import save_model
from ncd.data import build_dataset, get_info
from ncd.data.transforms import CenterCropNormalize
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.rows import Row, confusion_of, head_rows
from ncd.methods.common import RunContext, eval_splits, split_names

log = logging.getLogger("ncd")


def pixels(dataset: str, root: Path, split: str, crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of a split as flat float32 rows in [0, 1] (centre-cropped to ``crop_size``)."""
    ds = build_dataset(dataset, root, split)
    to_tensor = CenterCropNormalize(crop_size, [0.0], [1.0])  # center_crop + to_tensor; x - 0 / 1 is exact
    rows = []
    for i in tqdm(range(len(ds)), desc=f"read {split} pixels", mininterval=2.0, leave=False):
        img, _ = ds[i]
        rows.append(to_tensor(img).flatten().numpy())
    return np.stack(rows).astype(np.float32), np.asarray(ds.targets)


def run_kmeans(ctx: RunContext, out: Path) -> None:
    """Fit k-means (scikit-learn, ``n_init`` restarts, seeded) on the train split's pixels."""
    from sklearn.cluster import KMeans  # lazily: evaluating the centroids needs no fitting

    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    x, _ = pixels(dataset, ctx.data_root, info.train_split, info.crop_size)
    k = int(sc.get("num_clusters") or info.num_classes)
    log.info("k-means on %s/%s pixels: %d × %d, k=%d", dataset, info.train_split, *x.shape, k)
    km = KMeans(n_clusters=k, n_init=int(sc.get("n_init", 10)), max_iter=int(sc.get("max_iter", 300)),
                random_state=ctx.seed).fit(x)
    arch = {"kind": "kmeans", "backbone": "pixels", "in_channels": info.channels, "num_clusters": k,
            "crop_size": info.crop_size}
    save_model(out, {"centroids": torch.from_numpy(km.cluster_centers_.astype(np.float32))}, arch,
               ctx.meta(best_head=0, inertia=float(km.inertia_)))


def evaluate_kmeans(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict]:
    """Hungarian ACC, NMI and ARI (SCAN's protocol) of the nearest centroid of every image."""
    dataset, arch = ctx.cfg["dataset"], blob["arch"]
    names = split_names(get_info(dataset, ctx.data_root))
    c = blob["state_dict"]["centroids"].numpy()
    rows: list[Row] = []
    confusion: dict = {}
    for split in eval_splits(ctx):
        x, y = pixels(dataset, ctx.data_root, names[split], arch["crop_size"])
        d = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]
        res = hungarian_evaluate(torch.from_numpy(d.argmin(1)), torch.from_numpy(y), return_reordered=True)
        rows += head_rows(split, [res], ("acc", "nmi", "ari"), best=0)
        if split == "test":
            confusion = confusion_of(res, 0)
    return rows, confusion
