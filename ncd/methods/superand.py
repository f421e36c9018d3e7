"""Stage 1 of the two-stage classifier (Han et al., ECCV 2020; METHODS.md 6.3): Super-AND.

A memory bank of one embedding per training image, anchor neighbourhoods grown over five rounds
(25 % more anchors per round, chosen by the entropy of their similarity profile), and the loss
AND + AUG + w(t)·UE. One Nesterov SGD for all rounds, the per-round learning-rate rule
``lr · 0.1^⌊(e − 80)/40⌋`` for ``e ≥ 80``; the weighted-kNN monitor uses the memory bank as
the training features, as the official code does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ncd.checkpoint import save_model
from ncd.data import build_dataset, get_info
from ncd.data.batched import DeviceAugment, RawImages, augment_backend, simclr_views
from ncd.data.wrappers import MultiView, Transformed
from ncd.losses import anchor_neighbourhoods, memory_bank_update, super_and_loss
from ncd.methods.common import RunContext, build_optimizer, finish, make_loader, single_device
from ncd.methods.training import fit
from ncd.methods.twostage_eval import _renormalize, eval_transform, knn_monitor
from ncd.models.sobel import ResNet18withSobel, SuperANDModel

log = logging.getLogger("ncd")

# Super-AND's augmentation (METHODS 6.3) in terms of SCAN's ``simclr`` transform: the flip commutes
# with the colour operations, so only their order differs from the official Compose.
SAND_AUGMENT = {"crop_scale": (0.2, 1.0), "flip_p": 0.5, "jitter": (0.4, 0.4, 0.4, 0.4), "jitter_p": 1.0,
                "grayscale_p": 0.2}


def lr_factor(epoch: int, start: int = 80, every: int = 40, gamma: float = 0.1) -> float:
    """The official ``adjust_learning_rate``: 1 before ``start``, then ``gamma^⌊(epoch − start)/every⌋``
    (so with 80/40 the first decay is at epoch 120)."""
    return 1.0 if epoch < start else gamma ** ((epoch - start) // every)


def train_transform(ctx: RunContext, info, augment: dict[str, Any] | None):
    """Super-AND's per-image augmentation; ``augment`` overrides its parameters one by one."""
    t = ctx.transform("simclr", info, {**SAND_AUGMENT, **(augment or {})})
    return _renormalize(t, ctx.cfg.get("superand", {}).get("normalize"))


def train_views(ctx: RunContext, info, base, augment: dict[str, Any] | None) -> tuple[Any, tuple | None]:
    """The training items of Super-AND and stage 2, two views per image: ``MultiView`` of
    :func:`train_transform` (``augment.backend: pil``), or uint8 images and the two batched views
    that make the same augmentation on the training device (``batched``)."""
    if augment_backend(ctx.cfg) != "batched":
        t = train_transform(ctx, info, augment)
        return MultiView(base, [t, t]), None
    options = {**ctx.cfg.get("transform", {}), **SAND_AUGMENT, **(augment or {})}
    views = tuple(simclr_views(info, seed=ctx.seed, view=k, **options) for k in range(2))
    norm = ctx.cfg.get("superand", {}).get("normalize")
    if norm and norm.get("mean") is not None:  # as _renormalize does to the PIL transform
        for v in views:
            v.mean = torch.tensor(list(norm["mean"]), dtype=torch.float32).view(1, -1, 1, 1)
            v.std = torch.tensor(list(norm["std"]), dtype=torch.float32).view(1, -1, 1, 1)
    return RawImages(base), views


def build_encoder(ctx: RunContext, info, low_dim: int) -> ResNet18withSobel:
    return ResNet18withSobel(low_dim, info.channels, ctx.cfg["backbone"], dict(ctx.cfg.get("backbone_kwargs", {})))


def encoder_arch(ctx: RunContext, info, low_dim: int) -> dict[str, Any]:
    return {"backbone": ctx.cfg["backbone"], "in_channels": info.channels,
            "backbone_kwargs": dict(ctx.cfg.get("backbone_kwargs", {})), "low_dim": int(low_dim)}


def stage1_split(cfg: dict[str, Any], info) -> str:
    """Stage 1 trains on ``superand.split`` or the dataset's pretext split (STL-10: train+unlabeled)."""
    return cfg.get("superand", {}).get("split") or info.pretrain_split


def lr_schedule(opt: torch.optim.Optimizer, sched: dict[str, Any], period: int | None = None):
    """Per-epoch LambdaLR with :func:`lr_factor`; with ``period`` the epoch counts inside a round."""
    start, every, gamma = int(sched.get("start", 80)), int(sched.get("every", 40)), float(sched.get("gamma", 0.1))
    if period:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e % period, start, every, gamma))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, start, every, gamma))


class SuperANDModule(DeviceAugment, L.LightningModule):
    """``rounds × epochs`` epochs; round r starts (r ≥ 1) with a new anchor discovery on the memory."""

    def __init__(self, model: SuperANDModel, cfg: dict[str, Any], train_labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.model, self.cfg, self.num_classes = model, cfg, int(num_classes)
        n, k = model.memory.shape[0], int(cfg.get("ans_size", 1))
        self.epochs, self.rounds = int(cfg["epochs"]), int(cfg["rounds"])
        # a fixed-shape table (row i: the neighbours of anchor i, −1 elsewhere) so it resumes from last.ckpt
        self.register_buffer("neighbour_table", torch.full((n, k), -1, dtype=torch.long))
        self.register_buffer("entropy", torch.zeros(n))
        self.register_buffer("anchor_round", torch.tensor(0))
        self.register_buffer("train_labels", torch.as_tensor(train_labels, dtype=torch.long))
        self.ue_weight = 0.0
        self.consistency: float | None = None
        self.last_knn: float | None = None
        self._anchor_table: tuple[torch.Tensor, torch.Tensor] | None = None  # anchors() of the current round
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def round_epoch(self, epoch: int | None = None) -> tuple[int, int]:
        return divmod(self.current_epoch if epoch is None else epoch, self.epochs)

    def anchors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = (self.neighbour_table[:, 0] >= 0).nonzero().view(-1)
        return a, self.neighbour_table[a]

    def discover(self, rnd: int) -> None:
        c = self.cfg
        anchors, nbrs, ent = anchor_neighbourhoods(self.model.memory, rnd, float(c.get("select_rate", 0.25)),
                                                   int(c.get("ans_size", 1)), float(c.get("npc_temperature", 0.1)))
        self.neighbour_table.fill_(-1)
        self.neighbour_table[anchors] = nbrs
        self.entropy.copy_(ent)
        self.anchor_round.fill_(rnd)
        self._anchor_table = None
        # diagnostic only (the official "consistency"): anchor and neighbour share the true label
        y = self.train_labels
        la, ln = y[anchors].view(-1, 1), y[nbrs]
        known = (la >= 0) & (ln >= 0)
        self.consistency = float((la == ln)[known].float().mean()) if bool(known.any()) else None
        log.info("Super-AND round %d: %d anchors of %d (%.0f%%), ANs consistency %s", rnd, len(anchors),
                 len(y), 100.0 * len(anchors) / len(y),
                 "n/a" if self.consistency is None else f"{100 * self.consistency:.2f}%")

    def on_train_epoch_start(self) -> None:
        rnd, ep = self.round_epoch()
        if rnd > 0 and int(self.anchor_round) != rnd:
            self.discover(rnd)
        self.ue_weight = self._ue_weight()
        # the table changes only here: its nonzero() (a host sync) runs once per epoch, not per step
        self._anchor_table = self.anchors()

    def _ue_weight(self) -> float:
        _, ep = self.round_epoch()
        return float(self.cfg.get("ue_step", 0.2)) * (ep // int(self.cfg.get("ue_every", 80)))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views, _, idx = batch[0], batch[1], batch[2]
        b = views.shape[0]
        f = self.model(torch.cat([views[:, 0], views[:, 1]]))
        if self._anchor_table is None:
            # a run resumed mid-epoch: Lightning skips on_train_epoch_start, so set up here
            self._anchor_table = self.anchors()
            self.ue_weight = self._ue_weight()
        anchors, nbrs = self._anchor_table
        c = self.cfg
        res = super_and_loss(f, idx, self.model.memory, anchors, nbrs, ue_weight=self.ue_weight,
                             npc_temperature=float(c.get("npc_temperature", 0.1)),
                             batch_temperature=float(c.get("batch_temperature", 0.1)), neg_m=float(c.get("neg_m", 1.0)))
        # view-1 rows then view-2 rows in one call: the view-2 update wins (official CPU index_copy_)
        self.model.memory = memory_bank_update(self.model.memory, f, torch.cat([idx, idx]),
                                               float(c.get("npc_momentum", 0.5)))
        for k in ("loss", "loss_and", "loss_aug", "loss_ue"):
            self.log(f"train/{k}", res[k], on_step=False, on_epoch=True, prog_bar=k == "loss", batch_size=b)
        self.log("train/ue_weight", self.ue_weight, on_step=False, on_epoch=True, batch_size=b)
        return res["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        self._val.append((self.model(x).detach(), torch.as_tensor(y, device=x.device)))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        feats = torch.cat([v[0] for v in self._val])
        y = torch.cat([v[1] for v in self._val])
        self._val.clear()
        self.last_knn = knn_monitor(self.model.memory, self.train_labels, feats, y, self.num_classes,
                                    int(self.cfg.get("knn_k", 200)), float(self.cfg.get("knn_sigma", 0.1)))
        self.log("val/knn_top1", self.last_knn)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rnd, ep = self.round_epoch()
        checkpoint["superand"] = {"round": rnd, "epoch": ep, "anchor_round": int(self.anchor_round),
                                  "consistency": self.consistency, "knn_top1": self.last_knn}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("superand", {})
        self.consistency, self.last_knn = state.get("consistency"), state.get("knn_top1")

    def configure_optimizers(self):
        opt = build_optimizer(self.model.parameters(), self.cfg["optimizer"])
        sched = lr_schedule(opt, self.cfg.get("lr_schedule", {}), period=self.epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def run_superand(ctx: RunContext, out: Path) -> None:
    """Super-AND on the stage-1 split → model.ckpt (encoder + memory bank, written after the last round)."""
    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    single_device(ctx, "Super-AND keeps one memory bank per process")
    split = stage1_split(ctx.cfg, info)
    base = build_dataset(dataset, ctx.data_root, split)
    ds, views = train_views(ctx, info, base, sc.get("augment"))
    low_dim = int(sc.get("low_dim", 128))
    model = SuperANDModel(build_encoder(ctx, info, low_dim), len(ds))
    test = Transformed(build_dataset(dataset, ctx.data_root, info.test_split), eval_transform(ctx, info))
    module = SuperANDModule(model, sc, torch.as_tensor(base.targets), info.num_classes)
    module.views = views
    rounds, epochs = int(sc["rounds"]), int(sc["epochs"])
    log.info("Super-AND on %s/%s: %d images, backbone %s with Sobel, %d rounds x %d epochs, %s augmentation",
             dataset, split, len(ds), ctx.cfg["backbone"], rounds, epochs, augment_backend(ctx.cfg))
    fit(module, make_loader(ds, int(sc["batch_size"]), ctx, train=True), ctx, rounds * epochs,
        val_loader=make_loader(test, int(sc.get("eval_batch_size", 100)), ctx, train=False))
    arch = {"kind": "superand", **encoder_arch(ctx, info, low_dim), "memory_size": len(ds), "split": split}
    knn = module.last_knn
    save_model(out, model.state_dict(), arch,
               ctx.meta(round=rounds - 1, epoch=epochs - 1, knn_top1=knn,
                        num_anchors=int(len(module.anchors()[0])), consistency=module.consistency))
    log.info("Super-AND done: kNN top-1 on %s %s", info.test_split,
             "n/a" if knn is None or math.isnan(knn) else f"{100 * knn:.2f}%")
    finish(ctx)
