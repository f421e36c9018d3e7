"""CLD's evaluation (METHODS.md 5.7): weighted kNN on the instance features recomputed with the test
transform, k-means with Hungarian ACC/NMI/ARI on them (beyond the official code), and the ImageNet
linear probe."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from ncd.data import build_dataset, get_info
from ncd.data.cld import build_cld_transform
from ncd.data.wrappers import Transformed
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.knn import weighted_knn
from ncd.eval.rows import Row, confusion_of
from ncd.methods.common import (
    RunContext,
    collect,
    eval_loader,
    eval_splits,
    make_loader,
    restore,
    split_names,
)
from ncd.models.cld import CLDModel

log = logging.getLogger("ncd")


def linear_probe(ctx: RunContext, model: CLDModel, info, device: torch.device) -> float:
    """METHODS.md 5.7: a linear classifier on the frozen pooled backbone features (BN in eval
    mode), fc initialised N(0, 0.01) with zero bias, SGD (momentum 0.9) with step decay; train
    augmentation RRC(224) + flip (``linear``) or with RandAugment (``linear_ra``, InfoMin); top-1 on
    the test/val split with Resize + CenterCrop. Returns the top-1 accuracy."""
    pc = ctx.cfg["cld"]["probe"]
    dataset = ctx.cfg["dataset"]
    trunk = model.backbone.to(device).eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    fc = nn.Linear(model.backbone_dim, info.num_classes).to(device)
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)
    train = Transformed(build_dataset(dataset, ctx.data_root, info.train_split),
                        build_cld_transform(pc["augmentation"], info))
    test = Transformed(build_dataset(dataset, ctx.data_root, info.test_split), build_cld_transform("test", info))
    bs = min(int(pc["batch_size"]), len(train))
    loader = make_loader(train, bs, ctx, train=True)
    opt = torch.optim.SGD(fc.parameters(), lr=float(pc["lr"]), momentum=0.9, weight_decay=float(pc["weight_decay"]))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(pc["milestones"]), float(pc["gamma"]))
    for epoch in range(int(pc["epochs"])):
        fc.train()
        total, n = 0.0, 0
        for x, y, _ in tqdm(loader, desc=f"linear probe {epoch + 1}", leave=False, mininterval=5.0):
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y, device=device)
            with torch.no_grad():
                feats = trunk(x)
            loss = F.cross_entropy(fc(feats), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        sched.step()
        log.info("linear probe epoch %d/%d: loss %.4f", epoch + 1, int(pc["epochs"]), total / max(1, n))
    fc.eval()
    logits, y = collect(lambda x: fc(trunk(x)), make_loader(test, int(ctx.cfg["evaluate"]["batch_size"]), ctx, train=False),
                        device, "linear probe eval")
    return float((logits.argmax(1) == y).float().mean())


def evaluate_cld(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict[str, Any]]:
    """Metrics rows ``(split, head, metric, value)`` of a CLD checkpoint and the test confusion.

    * ``knn_top1`` (test): weighted kNN (K = ``evaluate.knn_k``, σ = ``cld.temperature``) of the
      test images against the train images, instance features recomputed with the test transform.
    * ``acc``, ``nmi``, ``ari``: k-means (scikit-learn, K = number of classes, 10 restarts) fitted
      on the train features, Hungarian ACC (SCAN's protocol), NMI and ARI of its clusters on each
      split of ``splits`` (beyond the official code).
    * ``linear_top1`` (test): :func:`linear_probe`, when ``cld.probe.epochs`` > 0.
    """
    model: CLDModel = restore(blob, device)
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    splits, bs = eval_splits(ctx), int(ctx.cfg["evaluate"]["batch_size"])
    sc, ev = ctx.cfg["cld"], ctx.cfg["evaluate"]
    test_t = build_cld_transform("test", info)
    names = split_names(info)

    def features(split: str) -> tuple[Tensor, Tensor]:
        return collect(lambda x: model(x, two_branch=False), eval_loader(ctx, info, names[split], test_t, bs), device,
                       f"embed {split}")

    rows: list[tuple[str, str, str, float]] = []
    confusion: dict[str, Any] = {}
    need = set(splits) | ({"train"} if (sc["knn"] or sc["kmeans_eval"]) else set())
    feats = {s: features(s) for s in sorted(need)} if (sc["knn"] or sc["kmeans_eval"]) else {}
    if sc["knn"] and "test" in splits:
        (bank, bank_y), (f, y) = feats["train"], feats["test"]
        res = weighted_knn(bank, bank_y, f, y, info.num_classes, k=min(int(ev["knn_k"]), len(bank)),
                           sigma=float(sc["temperature"]))
        rows.append(("test", "best", "knn_top1", float(res["top1"])))
    if sc["kmeans_eval"]:
        km = KMeans(n_clusters=info.num_classes, n_init=10, random_state=ctx.seed).fit(feats["train"][0].double().numpy())
        for split in splits:
            f, y = feats[split]
            pred = torch.from_numpy(km.predict(f.double().numpy()).astype(np.int64))
            res = hungarian_evaluate(pred, y, return_reordered=True)
            rows += [(split, "best", m, float(res[m])) for m in ("acc", "nmi", "ari")]
            if split == "test":
                confusion = confusion_of(res, "best")
    if int(sc["probe"]["epochs"]) > 0:
        rows.append(("test", "best", "linear_top1", linear_probe(ctx, model, info, device)))
    return rows, confusion


__all__ = ["evaluate_cld", "linear_probe"]
