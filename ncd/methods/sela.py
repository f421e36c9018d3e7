"""SeLa (Asano, Rupprecht, Vedaldi, ICLR 2020; official code yukimasano/self-label; METHODS.md 2):
cross-entropy training of ``hc`` heads against pseudo-labels, alternated with a label step that
re-assigns every image by Sinkhorn-Knopp under the equal-size constraint.

One LightningModule (:class:`SeLaModule`) and the stage runner (:func:`run_sela`); SeLa's augmentations
and evaluation rows (:func:`ncd.methods.sela_eval.evaluate_sela`: clustering metrics of the heads on the
test split and of the self-labels on the train split, weighted kNN, linear probe) are in
:mod:`ncd.methods.sela_eval`, which imports no Lightning.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ncd.checkpoint import save_model
from ncd.data import build_dataset, get_info
from ncd.data.batched import DeviceAugment, RawImages, augment_backend
from ncd.data.wrappers import Transformed
from ncd.errors import NcdError
from ncd.eval.knn import weighted_knn
from ncd.losses.sela import label_step_plan, sela_cost, sela_label_step
from ncd.methods.common import (
    RunContext,
    base_arch,
    build_optimizer,
    build_scheduler,
    finish,
    make_loader,
    single_device,
)
from ncd.methods.sela_eval import _knn_features, _transform, _views
from ncd.methods.training import fit
from ncd.models import build_backbone
from ncd.models.sela import SeLaModel

log = logging.getLogger("ncd")

#: the label cost is logged where N × K is at most this (it redoes the probabilities in memory)
_COST_MAX_ENTRIES = 10_000_000


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
class SeLaModule(DeviceAugment, L.LightningModule):
    """Mean over heads of the cross-entropy against the label matrix; the label step fires from
    ``on_train_batch_start`` on the schedule of :func:`label_step_times`.

    ``label_loader`` iterates the training images with the training augmentation (the official code
    collects the outputs for Sinkhorn-Knopp through its training loader), shuffled as that loader is
    (:func:`label_loader`); the features are stored by the dataset index each batch carries.
    The number of label steps done and the per-head loss sums live in buffers, so a resumed run
    continues the schedule and the head selection where it stopped.

    With ``knn_monitor.enabled`` (cifar.py), the validation loop gets two loaders, the train images
    and the test images (both with the val transform), and after every epoch the weighted kNN of the
    test images against the train images is computed; the best epoch's values live in buffers
    (``knn_best*``), so they travel in last.ckpt and a resumed run keeps them. ``num_classes`` is the
    kNN's class count (0: the largest train label + 1, as cifar_utils.kNN), ``knn_pca`` the PCA of
    the value reported for the best epoch.

    With ``augment.backend: batched`` both loaders hand over uint8 images: ``views`` (one) makes the
    training view, ``label_views`` the label pass's, keyed by the label step's number in place of the
    epoch (each pass draws afresh, and a resumed run draws what an uninterrupted one does).
    """

    view_layout = "single"

    def __init__(self, model: SeLaModel, cfg: dict[str, Any], label_loader: DataLoader, batch_size: int, *,
                 num_classes: int = 0, knn_pca: int = 0) -> None:
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
        self.label_views: torch.nn.Module | None = None
        self.num_classes, self.knn_pca = int(num_classes), int(knn_pca)
        # the kNN monitor's best epoch: its selection value (no PCA), the reported value (after knn_pca), the epoch
        self.register_buffer("knn_best_select", torch.full((), -1.0, dtype=torch.float64))
        self.register_buffer("knn_best_top1", torch.full((), -1.0, dtype=torch.float64))
        self.register_buffer("knn_best_epoch", torch.full((), -1, dtype=torch.long))
        self._val_parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    # -- label step ---------------------------------------------------------------------------
    @torch.no_grad()
    def collect_features(self) -> torch.Tensor:
        """Penultimate features of every training image (float32, CPU), row ``i`` = dataset index ``i``
        whatever order the label loader reads them in (main.py/cifar.py: ``PS[_selected, :] = ...``)."""
        n = self.model.labels.shape[1]
        feats = torch.empty(n, self.model.backbone_dim, dtype=torch.float32)
        was_training = self.model.training
        # the official pass runs in train mode (BatchNorm batch statistics, dropout on); "eval" is the alternative
        self.model.train(self.cfg["label_pass_mode"] == "train")
        for x, _, idx in self.label_loader:
            if isinstance(x, dict):  # augment.backend batched
                key = x["key"].clone()
                key[:, 0] = int(self.steps_done)
                x = self.label_views(x["image"].to(self.device, non_blocking=True), key.to(self.device))
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

    # -- kNN monitor (cifar.py: kNN(model, trainloader, testloader, K=10, sigma=0.1) after every epoch) --------
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # dataloader 0: the train images (cifar_utils.kNN swaps in the test transform), 1: the test images;
        # Lightning runs this in eval mode (kNN calls net.eval()) without gradients
        x, y, idx = batch
        self._val_parts.setdefault(dataloader_idx, []).append(
            (self.model.backbone(x).float().cpu(), torch.as_tensor(y).cpu(), torch.as_tensor(idx).cpu()))

    def on_validation_epoch_end(self) -> None:
        parts, self._val_parts = self._val_parts, {}
        if set(parts) != {0, 1}:
            return
        (bank, bank_y), (test, test_y) = _by_index(parts[0]), _by_index(parts[1])
        top1 = self._knn(bank, bank_y, test, test_y, pca=0)
        self.log("val/knn_top1", top1)
        # cifar.py keeps best_ckpt.t7 when acc > best_acc (ties keep the earlier epoch) and reports the kNN
        # after PCA (use_pca=True: 128 components) of that checkpoint: computed here, when the epoch becomes best
        if top1 > float(self.knn_best_select):
            report = self._knn(bank, bank_y, test, test_y, pca=self.knn_pca) if self.knn_pca else top1
            self.knn_best_select.fill_(top1)
            self.knn_best_top1.fill_(report)
            self.knn_best_epoch.fill_(self.current_epoch)
            log.info("kNN monitor: epoch %d is the best so far, kNN top-1 %.4f (reported, PCA %d: %.4f)",
                     self.current_epoch + 1, top1, self.knn_pca, report)

    def _knn(self, bank: torch.Tensor, bank_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
             pca: int) -> float:
        mon = self.cfg["knn_monitor"]
        a, b = _knn_features(bank, test, pca)
        c = self.num_classes or int(bank_y.max()) + 1
        res = weighted_knn(a.to(self.device), bank_y, b.to(self.device), test_y, c, k=min(int(mon["k"]), len(a)),
                           sigma=float(mon["sigma"]))
        return float(res["top1"])

    def knn_monitor_meta(self) -> dict[str, Any] | None:
        """The monitor's best epoch for the checkpoint meta (``None`` when it never ran)."""
        if int(self.knn_best_epoch) < 0:
            return None
        mon = self.cfg["knn_monitor"]
        return {"best_top1": float(self.knn_best_top1), "best_select_top1": float(self.knn_best_select),
                "best_epoch": int(self.knn_best_epoch) + 1, "k": int(mon["k"]), "sigma": float(mon["sigma"]),
                "pca": self.knn_pca}

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


def _by_index(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of validation batches ``(features, labels, index)``, in dataset-index order."""
    feats, ys, idx = (torch.cat(p) for p in zip(*parts))
    order = torch.argsort(idx)
    return feats[order], ys[order]


# ------------------------------------------------------------------------------------ stage
def label_batch_size(sc: dict[str, Any]) -> int:
    """The label pass's batch size: ``eval_batch_size``, or with 0 the training batch size (main.py's
    ``pseudo_loader`` is its ``train_loader``; cifar.py's ``opt_sk`` iterates ``trainloader``)."""
    return int(sc["eval_batch_size"]) or int(sc["batch_size"])


def label_loader(ds, ctx: RunContext) -> DataLoader:
    """The loader of the label step's pass over the training images ``ds`` (training augmentation).

    As the official code's (main.py: ``self.pseudo_loader = t_loader``, data.py ``get_aug_dataloader``
    with ``shuffle=True, drop_last=False``; cifar.py: ``opt_sk`` reads the shuffled ``trainloader``),
    it is shuffled (``label_pass_shuffle``) and keeps the last partial batch: in train mode BatchNorm
    normalises each batch by its own statistics, so on a class-sorted dataset (ImageNet) a
    dataset-order pass would feed batches of one class. Features are stored by index.
    """
    sc = ctx.cfg["sela"]
    return make_loader(ds, label_batch_size(sc), ctx, train=False, shuffle=bool(sc["label_pass_shuffle"]),
                       drop_last=False)


def _check_last_batch(n: int, batch_size: int, what: str, key: str) -> None:
    """A train-mode BatchNorm cannot normalise a batch of one image: refuse the batch size that leaves one."""
    if n > 1 and n % batch_size == 1:
        raise NcdError(f"sela.{key} {batch_size} leaves a last {what} batch of 1 of the {n} training images, which "
                       f"BatchNorm in train mode cannot normalise; expected a batch size with n % batch_size != 1")


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
    backend = augment_backend(ctx.cfg)
    ds = RawImages(base) if backend == "batched" else Transformed(base, _transform(ctx, info, "train"))
    bs, drop_last = int(sc["batch_size"]), bool(sc["drop_last"])
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and not drop_last:
        _check_last_batch(n, bs, "training", "batch_size")
    if has_bn and sc["label_pass_mode"] == "train":
        _check_last_batch(n, label_batch_size(sc), "label-pass", "eval_batch_size")
    mon = sc["knn_monitor"]
    module = SeLaModule(model, sc, label_loader(ds, ctx), bs, num_classes=info.num_classes,
                        knn_pca=int(sc.get("knn_pca", 0)))
    if backend == "batched":
        module.views = (_views(ctx, info, 0),)
        object.__setattr__(module, "label_views", _views(ctx, info, 1))  # not a submodule: no state
    # official loaders keep the last partial batch (ceil(N / B) steps per epoch; CIFAR-10 at 128: 391), and the
    # label schedule counts every one of them (niter = epoch * len(loader) + iter)
    train_loader = make_loader(ds, bs, ctx, train=True, drop_last=drop_last)
    val = None
    if mon["enabled"]:
        tf = _transform(ctx, info, "val")
        test = build_dataset(dataset, ctx.data_root, info.test_split)
        val = [make_loader(Transformed(base, tf), int(mon["batch_size"]), ctx, train=False),
               make_loader(Transformed(test, tf), int(mon["batch_size"]), ctx, train=False)]
    log.info("SeLa on %s: %d images, %d heads x %d clusters, %d epochs of %d steps, %d label steps (%s, relabel %s; "
             "label pass batch %d); label step storage %s, about %.0f MB; kNN monitor %s; %s augmentation", dataset, n,
             arch["num_heads"], arch["num_clusters"], sc["epochs"], len(train_loader), len(module.times),
             sc["label_schedule"], sc["relabel"], label_batch_size(sc), plan["storage"], plan["bytes"] / 2**20,
             "on" if val else "off", backend)
    with warnings.catch_warnings():  # without the monitor, Lightning notes the unused validation_step
        warnings.filterwarnings("ignore", message=r".*validation_step.*no `val_dataloader`")
        fit(module, train_loader, ctx, int(sc["epochs"]), val)
    losses = module.head_losses()
    best = int(np.argmin(losses))
    log.info("SeLa best head %d (mean training loss of the last epoch per head: %s)", best,
             [round(v, 4) for v in losses])
    monitor = module.knn_monitor_meta()
    if monitor is not None:
        log.info("SeLa kNN monitor: best epoch %d, kNN top-1 %.4f (selection value %.4f)", monitor["best_epoch"],
                 monitor["best_top1"], monitor["best_select_top1"])
    save_model(out, model.state_dict(), arch,
               ctx.meta(best_head=best, head_losses=losses, label_steps=int(module.steps_done),
                        label_log=module.label_log[-2 * arch["num_heads"]:],
                        **({"knn_monitor": monitor} if monitor is not None else {})))
    finish(ctx)
