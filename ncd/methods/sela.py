"""SeLa (Asano, Rupprecht, Vedaldi, ICLR 2020; official code yukimasano/self-label; METHODS.md 2):
cross-entropy training of ``hc`` heads against pseudo-labels, alternated with a label step that
re-assigns every image by Sinkhorn-Knopp under the equal-size constraint.

One LightningModule (:class:`SeLaModule`), the stage runner (:func:`run_sela`) and SeLa's evaluation
rows (:func:`evaluate_sela`: clustering metrics of the heads on the test split and of the self-labels on the
train split, weighted kNN, linear probe).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.decomposition import PCA
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from ncd.checkpoint import save_model
from ncd.data import build_dataset, get_info
from ncd.data.wrappers import Transformed
from ncd.errors import NcdError
from ncd.eval.clustering import hungarian_evaluate
from ncd.eval.knn import weighted_knn
from ncd.eval.linear_probe import linear_probe
from ncd.eval.metrics import clustering_metrics
from ncd.eval.rows import Row, confusion_of, head_rows
from ncd.losses.sela import label_step_plan, sela_cost, sela_label_step
from ncd.methods.common import (
    RunContext,
    base_arch,
    build_optimizer,
    build_scheduler,
    collect,
    eval_loader,
    eval_splits,
    finish,
    fit,
    make_loader,
    restore,
    single_device,
)
from ncd.models import build_backbone
from ncd.models.sela import SeLaModel

log = logging.getLogger("ncd")

#: the label cost is logged where N × K is at most this (it redoes the probabilities in memory)
_COST_MAX_ENTRIES = 10_000_000

# --------------------------------------------------------------------------------- augmentation
#: SeLa's training augmentations (METHODS.md 2.4). ``grayscale_first``: ImageNet's ``--augs 3`` applies
#: RandomGrayscale before ColorJitter, the CIFAR script after it. ColorJitter is always applied.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"resize": 0, "crop_size": 224, "crop_scale": (0.08, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4),
                 "jitter_p": 1.0, "grayscale_p": 0.2, "grayscale_first": True, "flip_p": 0.5, "eval_resize": 256},
    "cifar": {"resize": 256, "crop_size": 224, "crop_scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.4),
              "jitter_p": 1.0, "grayscale_p": 0.2, "grayscale_first": False, "flip_p": 0.5, "eval_resize": 256},
}


def sela_transform(kind: str, info, preset: str = "imagenet", **overrides: Any):
    """SeLa's ``train`` or ``val`` transform for ``info``'s images (preset + overrides).

    train: [Resize(resize)] → RandomResizedCrop(crop_size, crop_scale) → RandomGrayscale / ColorJitter
    (order by ``grayscale_first``) → horizontal flip → ToTensor → Normalize(dataset mean/std).
    val: [Resize(eval_resize)] → CenterCrop(crop_size) → ToTensor → Normalize.
    """
    if preset not in AUGMENT_PRESETS:
        raise NcdError(f"unknown SeLa augment preset {preset!r}; expected one of {', '.join(AUGMENT_PRESETS)}")
    unknown = sorted(set(overrides) - set(AUGMENT_PRESETS[preset]))
    if unknown:
        raise NcdError(f"unknown SeLa augment option(s) {', '.join(unknown)}; expected: {', '.join(AUGMENT_PRESETS[preset])}")
    o = {**AUGMENT_PRESETS[preset], **overrides}
    crop = int(o["crop_size"] or info.crop_size)
    norm = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if kind == "val":
        return T.Compose([*([T.Resize(o["eval_resize"])] if o["eval_resize"] else []), T.CenterCrop(crop), *norm])
    if kind != "train":
        raise NcdError(f"unknown SeLa transform kind {kind!r}; expected 'train' or 'val'")
    gray = T.RandomGrayscale(o["grayscale_p"])
    jitter = T.RandomApply([T.ColorJitter(*o["jitter"])], p=o["jitter_p"])
    return T.Compose([
        *([T.Resize(o["resize"])] if o["resize"] else []),
        T.RandomResizedCrop(crop, scale=tuple(o["crop_scale"])),
        *((gray, jitter) if o["grayscale_first"] else (jitter, gray)),
        T.RandomHorizontalFlip(o["flip_p"]),
        *norm,
    ])


def _transform(ctx: RunContext, info, kind: str):
    aug = dict(ctx.cfg["sela"].get("augment", {}))
    preset = aug.pop("preset", "imagenet")
    return sela_transform(kind, info, preset, **aug)


# ------------------------------------------------------------------------------------ schedule
def label_step_times(schedule: str, nopts: int, epochs: int, n: int) -> list[float]:
    """Sample counts at which label steps fire (METHODS.md 2.3); step ``i`` fires at the first batch
    with ``samples seen (batches before it × batch size) >= times[i]``, at most one per batch.

    ``quadratic`` (``main.py``; ``epochs`` = the E + 1 epochs its loop runs): ``(epochs + 0.01)·N·(i/(nopts−1))²``.
    ``linear`` (``cifar.py``; ``epochs`` = E): ``(epochs + 1.0001)·N·i/(nopts−1)``. As upstream, the
    last step(s) lie beyond the end of training and never fire.
    """
    if nopts < 1:
        raise NcdError(f"nopts must be >= 1, got {nopts}")
    grid = np.linspace(0.0, 1.0, nopts)
    if schedule == "quadratic":
        return ((epochs + 0.01) * n * grid**2).tolist()
    if schedule == "linear":
        return ((epochs + 1.0001) * n * grid).tolist()
    raise NcdError(f"unknown label schedule {schedule!r}; expected 'quadratic' or 'linear'")


def initial_labels(num_heads: int, n: int, k: int, seed: int) -> torch.Tensor:
    """Equal-size random partition per head: ``i mod K``, randomly permuted (independently per head)."""
    g = torch.Generator().manual_seed(int(seed))
    base = torch.arange(n) % k
    return torch.stack([base[torch.randperm(n, generator=g)] for _ in range(num_heads)])


# ------------------------------------------------------------------------------------ module
class SeLaModule(L.LightningModule):
    """Mean over heads of the cross-entropy against the label matrix; the label step fires from
    ``on_train_batch_start`` on the schedule of :func:`label_step_times`.

    ``label_loader`` iterates the training images with the training augmentation (the official code
    collects the outputs for Sinkhorn-Knopp through its training loader) in a fixed order.
    The number of label steps done and the per-head loss sums live in buffers, so a resumed run
    continues the schedule and the head selection where it stopped.
    """

    def __init__(self, model: SeLaModel, cfg: dict[str, Any], label_loader: DataLoader, batch_size: int) -> None:
        super().__init__()
        self.model, self.cfg, self.label_loader, self.batch_size = model, cfg, label_loader, int(batch_size)
        n = model.labels.shape[1]
        self.times = label_step_times(cfg["label_schedule"], int(cfg["nopts"]), int(cfg["epochs"]), n)
        h = model.num_heads
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("loss_sum", torch.zeros(h, dtype=torch.float64))
        self.register_buffer("loss_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("loss_epoch", torch.full((), -1, dtype=torch.long))  # the epoch loss_sum belongs to
        self.label_log: list[dict[str, Any]] = []

    # -- label step ---------------------------------------------------------------------------
    @torch.no_grad()
    def collect_features(self) -> torch.Tensor:
        """Penultimate features of every training image (float32, CPU, dataset order)."""
        n = self.model.labels.shape[1]
        feats = torch.empty(n, self.model.backbone_dim, dtype=torch.float32)
        was_training = self.model.training
        # the official pass runs in train mode (BatchNorm batch statistics, dropout on); "eval" is the alternative
        self.model.train(self.cfg["label_pass_mode"] == "train")
        for x, _, idx in self.label_loader:
            feats[idx] = self.model.backbone(x.to(self.device, non_blocking=True)).float().cpu()
        self.model.train(was_training)
        return feats

    @torch.no_grad()
    def label_step(self, heads: list[int]) -> None:
        t0 = time.perf_counter()
        feats = self.collect_features()
        t_feat = time.perf_counter() - t0
        ls = self.cfg["label_step"]
        n, k = self.model.labels.shape[1], self.model.num_clusters
        plan = label_step_plan(n, k, float(ls["memory_mb"]), ls["storage"], feats.shape[1], ls["chunk_size"] or None)
        device = self.device if ls["device"] == "auto" else torch.device(ls["device"])
        for h in heads:
            head = self.model.heads[h]
            labels, _, _, info = sela_label_step(
                feats, head.weight, head.bias, float(self.cfg["lamb"]), float(self.cfg["tol"]),
                int(self.cfg["check_every"]), storage=plan["storage"], chunk_size=ls["chunk_size"] or None,
                device=device, return_info=True)
            old = self.model.labels[h]
            new = labels.to(old.device)
            changed = float((new != old).float().mean())
            self.model.labels[h] = new
            cost = None
            if n * k <= _COST_MAX_ENTRIES:  # the CIFAR script's cost, where the probabilities are cheap to redo
                p = torch.softmax(feats.double() @ head.weight.double().cpu().t() + head.bias.double().cpu(), 1)
                cost = float(sela_cost(p, new.cpu()))
            entry = {"step": int(self.steps_done), "epoch": self.current_epoch, "head": h,
                     "iterations": info["iterations"], "error": info["error"], "seconds": info["seconds"],
                     "storage": info["storage"], "changed": changed, "cost": cost}
            self.label_log.append(entry)
            log.info("label step %d/%d (epoch %d) head %d: %d SK iterations, err %.3g, %.2f s (%s), "
                     "%.1f%% labels changed, cost %s", entry["step"] + 1, len(self.times), self.current_epoch + 1, h,
                     info["iterations"], info["error"], info["seconds"], info["storage"], 100 * changed,
                     "–" if cost is None else f"{cost:.4f}")
        log.info("label step took %.2f s (features %.2f s)", time.perf_counter() - t0, t_feat)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        done = int(self.steps_done)
        # samples seen before this batch, as the official niter * batch_size
        if done < len(self.times) and self.trainer.global_step * self.batch_size >= self.times[done]:
            heads = (list(range(self.model.num_heads)) if self.cfg["relabel"] == "all"
                     else [self.current_epoch % self.model.num_heads])
            self.label_step(heads)
            self.steps_done += 1

    # -- training -----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        if int(self.loss_epoch) != self.current_epoch:  # a run resumed mid-epoch keeps its sums
            self.loss_sum.zero_()
            self.loss_batches.zero_()
            self.loss_epoch.fill_(self.current_epoch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, _, idx = batch
        logits = self.model(x)
        targets = self.model.labels[:, idx]
        per_head = torch.stack([F.cross_entropy(logits[h], targets[h]) for h in range(logits.shape[0])])
        loss = per_head.mean()
        self.loss_sum += per_head.detach().double()
        self.loss_batches += 1
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def head_losses(self) -> list[float]:
        """Mean training loss per head over the current (after training: the last) epoch."""
        return [float(v) / max(1, int(self.loss_batches)) for v in self.loss_sum]

    def configure_optimizers(self):
        opt = build_optimizer(self.parameters(), self.cfg["optimizer"])
        sc = self.cfg.get("scheduler", {})
        if sc.get("name") == "multistep":
            # the official schedules are step functions of the epoch: ImageNet ×0.1 at 150, 300, 350; CIFAR at 240, 320
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(m) for m in sc.get("milestones", [])],
                                                         float(sc.get("gamma", 0.1)))
        else:
            sched = build_scheduler(opt, sc, int(self.cfg["epochs"]))
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


# ------------------------------------------------------------------------------------ stage
def sela_arch(ctx: RunContext, info, dim: int, n: int) -> dict[str, Any]:
    sc = ctx.cfg["sela"]
    return base_arch(ctx, "sela", info.channels, dim, num_heads=int(sc["num_heads"]),
                     num_clusters=int(sc["num_clusters"]) or info.num_classes, num_samples=n, head_init=sc["head_init"])


def run_sela(ctx: RunContext, out: Path) -> None:
    """Train SeLa on the train split; model.ckpt holds the network, the label matrix and the best head."""
    sc = ctx.cfg["sela"]
    single_device(ctx, "SeLa runs on one device (its label step needs every output in one place)")
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    base = build_dataset(dataset, ctx.data_root, info.train_split)
    n = len(base)
    backbone, dim = build_backbone(ctx.cfg["backbone"], info.channels, **ctx.cfg.get("backbone_kwargs", {}))
    arch = sela_arch(ctx, info, dim, n)
    model = SeLaModel(backbone, dim, arch["num_heads"], arch["num_clusters"], n, head_init=arch["head_init"])
    model.labels.copy_(initial_labels(arch["num_heads"], n, arch["num_clusters"], ctx.seed))
    plan = label_step_plan(n, arch["num_clusters"], float(sc["label_step"]["memory_mb"]), sc["label_step"]["storage"], dim)
    ds = Transformed(base, _transform(ctx, info, "train"))
    module = SeLaModule(model, sc, make_loader(ds, int(sc["eval_batch_size"]), ctx, train=False), int(sc["batch_size"]))
    log.info("SeLa on %s: %d images, %d heads x %d clusters, %d epochs, %d label steps (%s, relabel %s); "
             "label step storage %s, about %.0f MB", dataset, n, arch["num_heads"], arch["num_clusters"], sc["epochs"],
             len(module.times), sc["label_schedule"], sc["relabel"], plan["storage"], plan["bytes"] / 2**20)
    fit(module, make_loader(ds, int(sc["batch_size"]), ctx, train=True), ctx, int(sc["epochs"]))
    losses = module.head_losses()
    best = int(np.argmin(losses))
    log.info("SeLa best head %d (mean training loss of the last epoch per head: %s)", best,
             [round(v, 4) for v in losses])
    save_model(out, model.state_dict(), arch,
               ctx.meta(best_head=best, head_losses=losses, label_steps=int(module.steps_done),
                        label_log=module.label_log[-2 * arch["num_heads"]:]))
    finish(ctx)


# ------------------------------------------------------------------------------------ evaluation
def _knn_features(train: torch.Tensor, test: torch.Tensor, pca: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features for the kNN, optionally after PCA fitted on the train features (SeLa's
    CIFAR report uses 128 components)."""
    if pca:
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
    lp = sc.get("linear_probe", {})
    if lp.get("enabled", True):
        opts = {key: v for key, v in lp.items() if key != "enabled"}
        res = linear_probe(feats_tr, y_tr, feats_te, y_te, info.num_classes, seed=ctx.seed,
                           accelerator="gpu" if device.type == "cuda" else "cpu", **opts)
        rows.append(("test", "best", "linear_top1", float(res["top1"])))
    return rows, confusion
