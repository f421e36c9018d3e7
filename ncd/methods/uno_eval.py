"""UNO's evaluation (METHODS.md 3.6) and what it shares with the training stages (:mod:`ncd.methods.uno`):
the known/novel class split of an experiment and the relabelled view of a dataset. No Lightning here,
so that an evaluate job starts without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from ncd.data import build_dataset, get_info
from ncd.data.uno import (
    build_uno_transform,
    remap_targets,
    uno_imagenet_split_ids,
    uno_split,
)
from ncd.errors import NcdError
from ncd.eval.clustering import cluster_acc, hungarian_evaluate
from ncd.eval.knn import weighted_knn
from ncd.eval.partition import adjusted_rand_index, normalized_mutual_info
from ncd.eval.rows import Row, confusion_of, head_rows
from ncd.methods.common import RunContext, make_loader, restore


def resolve_split(cfg: dict[str, Any], data_root: Path) -> tuple[list[int], list[int]]:
    """Known and novel class ids in the dataset's label space, from ``split`` or ``split_name``."""
    if cfg.get("split"):
        return list(cfg["split"]["known"]), list(cfg["split"]["novel"])
    name = cfg.get("split_name")
    if not name:
        raise NcdError("a UNO experiment needs 'split' (known/novel class ids) or 'split_name'; got neither")
    if name.startswith("imagenet-"):
        train = Path(data_root) / "train"
        wnids = sorted(p.name for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
        return uno_imagenet_split_ids(name.split("-", 1)[1], wnids)
    dataset, known, novel = uno_split(name)
    if dataset != cfg["dataset"]:
        raise NcdError(f"split_name {name!r} is for dataset {dataset!r}, but the experiment uses {cfg['dataset']!r}")
    return known, novel


class Relabeled(Dataset):
    """The images of ``base`` whose class is known or novel, relabeled known → 0..nlc−1,
    novel → nlc..nlc+nuc−1; items are ``(views, target, index)`` with one view per transform."""

    def __init__(self, base: Dataset, known: list[int], novel: list[int], transforms: list, classes: str = "all") -> None:
        targets, keep = remap_targets(np.asarray(base.targets), known, novel)
        nlc = len(known)
        if classes == "known":
            keep &= targets < nlc
        elif classes == "novel":
            keep &= targets >= nlc
        self.base, self.transforms = base, transforms
        self.indices = np.flatnonzero(keep)
        self.targets = targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, _ = self.base[int(self.indices[i])]
        views = [t(img) for t in self.transforms]
        return (views if len(views) > 1 else views[0]), int(self.targets[i]), i


class RawRelabeled(Relabeled):
    """:class:`Relabeled` for ``augment.backend: batched``: ``({"image": uint8 [C, H, W], "key": [epoch,
    base index]}, target, index)``, the views made on the training device. The key holds the index in
    the base dataset, so an image draws the same views whichever subset (known, novel, all) holds it."""

    def __init__(self, base: Dataset, known: list[int], novel: list[int], classes: str = "all") -> None:
        super().__init__(base, known, novel, [], classes)

    def keyed_item(self, epoch: int, i: int):
        from ncd.data.batched import raw_image

        j = int(self.indices[i])
        return ({"image": raw_image(self.base, j)[0], "key": torch.tensor([epoch, j], dtype=torch.int64)},
                int(self.targets[i]), i)

    def __getitem__(self, i: int):
        return self.keyed_item(0, i)


@torch.no_grad()
def _outputs(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labeled logits ``[N, C_l]``, every head's novel logits ``[H, N, C_u]``, the targets and the
    L2-normalised backbone features ``[N, D]``."""
    lab, unlab, ys, feats = [], [], [], []
    for x, y, _ in tqdm(loader, desc="predict", leave=False, mininterval=2.0):
        o = model(x.to(device, non_blocking=True))
        lab.append(o["logits_lab"].float().cpu())
        unlab.append(o["logits_unlab"].float().cpu())
        feats.append(F.normalize(o["feats"].float(), dim=1).cpu())
        ys.append(torch.as_tensor(y))
    return torch.cat(lab), torch.cat(unlab, dim=1), torch.cat(ys), torch.cat(feats)


def evaluate_uno(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict]:
    """UNO's three protocols (METHODS 3.6): task-aware and task-agnostic clustering accuracy on the
    novel classes of the train and test splits (per head, ``avg`` and ``best``), and accuracy on
    the known test classes. Besides them, for the report's table across methods, the protocol every
    method shares on the whole test split: Hungarian ``acc`` (K = number of classes), ``nmi`` and
    ``ari`` of the task-agnostic prediction (argmax over known ‖ novel logits of the best head), and
    ``knn_top1``, the weighted kNN (``evaluate.knn_k``, ``knn_sigma``) of the backbone features
    with the whole train split as the bank."""
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    model = restore(blob, device)
    known, novel = resolve_split(ctx.cfg, ctx.data_root)
    best, bs = int(blob["meta"].get("best_head", 0)), int(ctx.cfg["evaluate"]["batch_size"])
    t = build_uno_transform("eval", info)
    rows: list[Row] = []
    confusion: dict = {}
    for name, split, classes in (("train-novel", info.train_split, "novel"), ("test-novel", info.test_split, "novel"),
                                 ("test-known", info.test_split, "known")):
        ds = Relabeled(build_dataset(ctx.cfg["dataset"], ctx.data_root, split), known, novel, [t], classes=classes)
        lab, unlab, y, _ = _outputs(model, make_loader(ds, bs, ctx, train=False), device)
        if classes == "known":
            agnostic = torch.cat([lab, unlab[best]], dim=1).argmax(1)
            rows += [(name, "best", "acc", float((lab.argmax(1) == y).float().mean())),
                     (name, "best", "acc_agnostic", float((agnostic == y).float().mean()))]
            continue
        target = (y - y.min()).numpy()  # UNO shifts the novel targets by their minimum
        results = []
        for h in range(unlab.shape[0]):
            aware = unlab[h].argmax(1).numpy()
            agnostic = torch.cat([lab, unlab[h]], dim=1).argmax(1).numpy()
            results.append({"acc": cluster_acc(target, aware), "acc_agnostic": cluster_acc(target, agnostic),
                            "nmi": normalized_mutual_info(target, aware), "ari": adjusted_rand_index(target, aware)})
            if h == best and name == "test-novel":
                res = hungarian_evaluate(torch.from_numpy(aware), torch.from_numpy(target), return_reordered=True)
                confusion = confusion_of(res, best)
        rows += head_rows(name, results, ("acc", "acc_agnostic", "nmi", "ari"), best, avg=True)
    return rows + _whole_test_split(ctx, model, info, known, novel, best, device), confusion


def _whole_test_split(ctx: RunContext, model, info, known: list[int], novel: list[int], best: int,
                      device: torch.device) -> list[Row]:
    """The shared protocol of the table across methods on every class of the test split."""
    t, bs, ev = build_uno_transform("eval", info), int(ctx.cfg["evaluate"]["batch_size"]), ctx.cfg["evaluate"]
    out = {}
    for split in (info.train_split, info.test_split):
        ds = Relabeled(build_dataset(ctx.cfg["dataset"], ctx.data_root, split), known, novel, [t], classes="all")
        out[split] = _outputs(model, make_loader(ds, bs, ctx, train=False), device)
    lab, unlab, y, feats = out[info.test_split]
    pred = torch.cat([lab, unlab[best]], dim=1).argmax(1).numpy()
    target = y.numpy()
    bank, bank_y = out[info.train_split][3], out[info.train_split][2]
    knn = weighted_knn(bank.to(device), bank_y.to(device), feats.to(device), y.to(device), len(known) + len(novel),
                       k=min(int(ev["knn_k"]), len(bank)), sigma=float(ev["knn_sigma"]))
    return [("test", "best", "acc", cluster_acc(target, pred)),
            ("test", "best", "nmi", normalized_mutual_info(target, pred)),
            ("test", "best", "ari", adjusted_rand_index(target, pred)),
            ("test", "best", "knn_top1", float(knn["top1"]))]


__all__ = ["Relabeled", "evaluate_uno", "resolve_split"]
