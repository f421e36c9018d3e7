"""CLD's evaluation (METHODS.md 5.7): weighted kNN on the instance features recomputed with the test
transform, and k-means with Hungarian ACC/NMI/ARI on them (beyond the official code). The ImageNet
linear probe is a stage of its own (:mod:`ncd.methods.cld_probe`)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncd.data import get_info
from ncd.data.cld import build_cld_transform
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.knn import weighted_knn
from ncd.eval.rows import Row, confusion_of, selected_on_test
from ncd.methods.common import (
    RunContext,
    collect,
    eval_loader,
    eval_splits,
    restore,
    split_names,
)
from ncd.models.cld import CLDModel

log = logging.getLogger("ncd")


def evaluate_cld(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict[str, Any]]:
    """Metrics rows ``(split, head, metric, value)`` of a CLD checkpoint and the test confusion.

    * ``knn_top1`` (test): weighted kNN (K = ``evaluate.knn_k``, σ = ``cld.temperature``) of the
      test images against the train images, instance features recomputed with the test transform;
      beside it ``knn_top1_selected_on_test``: the training-time kNN monitor's best epoch, what the
      official CIFAR loops report (``best_acc1`` of CLD's ``train_cifar_*_cld.py``, ``best_acc`` of
      NPID's ``cifar.py``), when the checkpoint has a monitor history.
    * ``acc``, ``nmi``, ``ari``: k-means (scikit-learn, K = number of classes, 10 restarts) fitted
      on the train features, Hungarian ACC (SCAN's protocol), NMI and ARI of its clusters on each
      split of ``splits`` (beyond the official code).

    ``linear_top1`` comes from the ``cld_probe`` stage (:func:`ncd.methods.cld_probe.evaluate_cld_probe`).
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
        best = knn_selected_on_test(blob.get("meta") or {})
        if best is not None:
            rows.append(("test", "best", selected_on_test("knn_top1"), best))
    if sc["kmeans_eval"]:
        from sklearn.cluster import KMeans  # lazily: only the k-means rows need it

        km = KMeans(n_clusters=info.num_classes, n_init=10, random_state=ctx.seed).fit(feats["train"][0].double().numpy())
        for split in splits:
            f, y = feats[split]
            pred = torch.from_numpy(km.predict(f.double().numpy()).astype(np.int64))
            res = hungarian_evaluate(pred, y, return_reordered=True)
            rows += [(split, "best", m, float(res[m])) for m in ("acc", "nmi", "ari")]
            if split == "test":
                confusion = confusion_of(res, "best")
    return rows, confusion


def knn_selected_on_test(meta: dict[str, Any]) -> float | None:
    """The best kNN top-1 of a CLD checkpoint's monitor (``meta["knn_best"]``, else the maximum of
    ``meta["knn_history"]``), or None when the monitor was off."""
    best = meta.get("knn_best")
    if best:
        return float(best[1])
    history = meta.get("knn_history") or []
    return max((float(v) for _, v in history), default=None)


__all__ = ["evaluate_cld", "knn_selected_on_test"]
