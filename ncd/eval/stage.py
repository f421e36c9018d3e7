"""The evaluate stage: one model.ckpt in, one metrics.json (rows of the metrics table) out."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ncd.checkpoint import load_model, load_state_strict
from ncd.data import build_dataset, get_info
from ncd.data.wrappers import Transformed
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.knn import weighted_knn
from ncd.methods.common import RunContext, collect, inference_device, make_loader
from ncd.models import model_from_arch
from ncd.utils import device_description, git_commit, package_versions, write_json_atomic

log = logging.getLogger("ncd")


def _clustering_rows(probs: torch.Tensor, targets: torch.Tensor, best: int) -> tuple[list[tuple], dict]:
    """Per-head metrics rows ``(head, metric, value)`` plus the best head's confusion matrix."""
    rows, confusion = [], {}
    for h in range(probs.shape[0]):
        res = hungarian_evaluate(probs[h].argmax(1), targets, probs[h], return_reordered=True)
        for m in ("acc", "nmi", "ari", "acc_top5"):
            rows.append((str(h), m, float(res[m])))
            if h == best:
                rows.append(("best", m, float(res[m])))
        if h == best:
            confusion = {"head": best, "matrix": np.asarray(res["confusion"]).tolist()}
    return rows, confusion


@torch.no_grad()
def _uno_outputs(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tqdm import tqdm

    lab, unlab, ys = [], [], []
    for x, y, _ in tqdm(loader, desc="predict", leave=False, mininterval=2.0):
        o = model(x.to(device))
        lab.append(o["logits_lab"].float().cpu())
        unlab.append(o["logits_unlab"].float().cpu())
        ys.append(torch.as_tensor(y))
    return torch.cat(lab), torch.cat(unlab, dim=1), torch.cat(ys)


def _uno_rows(ctx: RunContext, model, info, meta: dict, device, bs: int) -> tuple[list[tuple], dict]:
    """UNO's three protocols (METHODS 3.6): task-aware and task-agnostic clustering accuracy on the
    novel classes of the train and test splits (per head, ``avg`` and ``best``), and accuracy on
    the known test classes."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from ncd.eval.clustering import cluster_acc
    from ncd.methods.uno import Relabeled, resolve_split

    known, novel = resolve_split(ctx.cfg, ctx.data_root)
    best = int(meta.get("best_head", 0))
    from ncd.data.uno import build_uno_transform

    t = build_uno_transform("eval", info)
    rows, confusion = [], {}
    for name, split, classes in (("train-novel", info.train_split, "novel"), ("test-novel", info.test_split, "novel"),
                                 ("test-known", info.test_split, "known")):
        ds = Relabeled(build_dataset(ctx.cfg["dataset"], ctx.data_root, split), known, novel, [t], classes=classes)
        lab, unlab, y = _uno_outputs(model, make_loader(ds, bs, ctx, train=False), device)
        if classes == "known":
            rows.append((name, "best", "acc", float((lab.argmax(1) == y).float().mean())))
            agnostic = torch.cat([lab, unlab[best]], dim=1).argmax(1)
            rows.append((name, "best", "acc_agnostic", float((agnostic == y).float().mean())))
            continue
        target = (y - y.min()).numpy()  # UNO shifts the novel targets by their minimum
        per_head: dict[str, list[float]] = {"acc": [], "acc_agnostic": [], "nmi": [], "ari": []}
        for h in range(unlab.shape[0]):
            aware = unlab[h].argmax(1).numpy()
            agnostic = torch.cat([lab, unlab[h]], dim=1).argmax(1).numpy()
            vals = {"acc": cluster_acc(target, aware), "acc_agnostic": cluster_acc(target, agnostic),
                    "nmi": normalized_mutual_info_score(target, aware), "ari": adjusted_rand_score(target, aware)}
            for m, v in vals.items():
                per_head[m].append(float(v))
                rows.append((name, str(h), m, float(v)))
                if h == best:
                    rows.append((name, "best", m, float(v)))
            if h == best and name == "test-novel":
                res = hungarian_evaluate(torch.from_numpy(aware), torch.from_numpy(target), return_reordered=True)
                confusion = {"head": best, "matrix": np.asarray(res["confusion"]).tolist()}
        rows += [(name, "avg", m, float(np.mean(v))) for m, v in per_head.items()]
    return rows, confusion


def evaluate(ctx: RunContext, ckpt: Path, method: str, out: Path) -> list[dict[str, Any]]:
    """Evaluate ``ckpt`` on the splits of ``evaluate.splits``; write ``out`` (metrics.json)."""
    t0 = time.time()
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    blob = load_model(ckpt)
    arch, meta = blob["arch"], blob["meta"]
    splits = ctx.cfg.get("evaluate", {}).get("splits", ["test"])
    split_names = {"train": info.train_split, "test": info.test_split}
    device = inference_device(ctx.runtime)
    bs = int(ctx.cfg.get("evaluate", {}).get("batch_size", 512))
    kind = arch["kind"]
    rows: list[tuple[str, str, str, float]] = []   # (split, head, metric, value)
    confusion: dict[str, Any] = {}

    def loader(split: str):
        ds = Transformed(build_dataset(dataset, ctx.data_root, split_names[split]), ctx.transform("val", info))
        return make_loader(ds, bs, ctx, train=False)

    if kind == "kmeans":
        from ncd.methods.kmeans import pixels

        c = blob["state_dict"]["centroids"].numpy()
        for split in splits:
            x, y = pixels(dataset, ctx.data_root, split_names[split], arch["crop_size"])
            d = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None]
            pred = torch.from_numpy(d.argmin(1))
            res = hungarian_evaluate(pred, torch.from_numpy(y), return_reordered=True)
            for m in ("acc", "nmi", "ari"):
                rows += [(split, "0", m, float(res[m])), (split, "best", m, float(res[m]))]
            if split == "test":
                confusion = {"head": 0, "matrix": np.asarray(res["confusion"]).tolist()}
    else:
        model = model_from_arch(arch)
        load_state_strict(model, blob["state_dict"], f"checkpoint {ckpt}")
        model.to(device).eval()
        if kind == "contrastive":
            bank, bank_y = collect(model, loader("train"), device, "embed train")
            k = int(ctx.cfg.get("evaluate", {}).get("knn_k", 200))
            for split in splits:
                feats, y = (bank, bank_y) if split == "train" else collect(model, loader(split), device, f"embed {split}")
                res = weighted_knn(bank, bank_y, feats, y, info.num_classes, k=min(k, len(bank)),
                                   sigma=float(ctx.cfg.get("evaluate", {}).get("knn_sigma", 0.1)))
                rows.append((split, "best", "knn_top1", float(res["top1"])))
        elif kind == "clustering":
            best = int(meta.get("best_head", 0))
            for split in splits:
                logits, y = collect(model, loader(split), device, f"predict {split}")
                r, conf = _clustering_rows(torch.softmax(logits, -1), y, best)
                rows += [(split, *row) for row in r]
                if split == "test":
                    confusion = conf
        elif kind == "uno":
            uno_rows, confusion = _uno_rows(ctx, model, info, meta, device, bs)
            rows += uno_rows
        elif kind == "cld":
            from ncd.methods.cld import evaluate_cld

            cld_rows, confusion = evaluate_cld(ctx, model, info, splits, device, bs)
            rows += cld_rows
        elif kind in ("superand", "twostage"):
            from ncd.methods.twostage import evaluate_rows

            twostage_rows, confusion = evaluate_rows(ctx, model, arch, meta, splits, device, bs)
            rows += twostage_rows
        elif kind == "sela":
            from ncd.methods.sela import sela_rows

            sela_rows_, confusion = sela_rows(ctx, model, meta, info, device, bs)
            rows += sela_rows_
        else:
            from ncd.errors import NcdError

            raise NcdError(f"checkpoint {ckpt} has kind {kind!r}; expected kmeans, contrastive, clustering, uno, superand, twostage, cld or sela")
    records = [{"experiment": ctx.experiment, "method": method, "stage": ctx.stage, "dataset": dataset,
                "split": s, "seed": ctx.seed, "head": h, "metric": m, "value": v} for s, h, m, v in rows]
    for r in records:
        if r["head"] == "best":
            log.info("%s %s %s seed %d %s: %s = %.4f", ctx.experiment, ctx.stage, r["split"], ctx.seed,
                     r["head"], r["metric"], r["value"])
    result = {
        "rows": records,
        "confusion": {"split": "test", **confusion} if confusion else None,
        "provenance": {
            "config_hash": meta.get("config_hash"), "git_commit": git_commit(), "packages": package_versions(),
            "device": device_description(), "wall_time_s": meta.get("wall_time_s"),
            "eval_time_s": time.time() - t0,
        },
        "meta": meta,
    }
    write_json_atomic(out, result)
    return records
