"""Stage 2 of the two-stage classifier (Han et al., ECCV 2020; METHODS.md 6.4); the evaluation of both
stages is :mod:`ncd.methods.twostage_eval`.

The encoder from stage 1 is fine-tuned so that five fixed, normalised softmax heads (weights
N(0, 1), never trained) agree across two views (IIC mutual information, mean over heads), while
the consistency-preserving loss keeps the embedding's neighbourhoods. The model written is the
one of the epoch with the lowest mean training loss, and its ``best`` head the one with the
lowest summed MI loss in that epoch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ncd.checkpoint import load_model, load_state_strict, save_model, sub_state
from ncd.data import build_dataset, get_info
from ncd.data.batched import DeviceAugment, augment_backend
from ncd.errors import NcdError
from ncd.losses import twostage_loss
from ncd.methods.common import RunContext, build_optimizer, finish, make_loader, single_device
from ncd.methods.superand import build_encoder, encoder_arch, lr_schedule, train_views
from ncd.methods.training import fit
from ncd.methods.twostage_eval import stage2_split
from ncd.models.sobel import TwoStageModel

log = logging.getLogger("ncd")


class TwoStageModule(DeviceAugment, L.LightningModule):
    """IIC over the fixed heads + L_cp; tracks the epoch with the lowest mean training loss.

    The per-epoch sums are buffers tagged with their epoch and an epoch is closed at the start of
    the next one (and by :meth:`close`), so a run resumed from last.ckpt loses no epoch.
    """

    def __init__(self, model: TwoStageModel, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        h = model.head_weights.shape[0]
        self.register_buffer("mi_sum", torch.zeros(h, dtype=torch.float64))
        self.register_buffer("loss_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("sums_epoch", torch.tensor(-1))
        self.best: dict[str, Any] = {"loss": math.inf, "epoch": -1, "mi_per_head": None, "state": None}

    def close(self) -> None:
        """Compare the finished epoch's mean training loss with the best so far."""
        n = int(self.num_batches)
        if n > 0:
            mean = float(self.loss_sum) / n
            if mean < self.best["loss"]:
                self.best = {"loss": mean, "epoch": int(self.sums_epoch), "mi_per_head": self.mi_sum.cpu().tolist(),
                             "state": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
                log.info("two-stage: epoch %d has the lowest mean training loss so far (%.4f)",
                         int(self.sums_epoch) + 1, mean)
        self.mi_sum.zero_()
        self.loss_sum.zero_()
        self.num_batches.zero_()

    def on_train_epoch_start(self) -> None:
        if int(self.sums_epoch) != self.current_epoch:
            self.close()
            self.sums_epoch.fill_(self.current_epoch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views = batch[0]
        b = views.shape[0]
        f = self.model.encoder(torch.cat([views[:, 0], views[:, 1]]))
        c = self.cfg
        res = twostage_loss(f, self.model.head_weights, float(c.get("head_temperature", 0.1)),
                            float(c.get("batch_temperature", 0.1)), float(c.get("neg_m", 1.0)),
                            normalize=self.model.normalize)
        self.mi_sum += res["mi_per_head"].detach().double()
        self.loss_sum += res["loss"].detach().double()
        self.num_batches += 1
        for k in ("loss", "loss_mi", "loss_cp"):
            self.log(f"train/{k}", res[k], on_step=False, on_epoch=True, prog_bar=k == "loss", batch_size=b)
        return res["loss"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["twostage_best"] = self.best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best = checkpoint.get("twostage_best", self.best)

    def configure_optimizers(self):
        # the encoder only: the heads are buffers, the Sobel filters are frozen
        params = [p for p in self.model.encoder.parameters() if p.requires_grad]
        opt = build_optimizer(params, self.cfg["optimizer"])
        sched = lr_schedule(opt, self.cfg.get("lr_schedule", {}))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def run_twostage(ctx: RunContext, embed_ckpt: Path | None, out: Path) -> None:
    """Stage 2 on the labelled split :func:`stage2_split`, from the stage-1 checkpoint (``init: superand``) or from a
    random encoder (``init: scratch``, the supplement's ablation) → model.ckpt."""
    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    single_device(ctx, "stage 2 picks its epoch and head from one process's training losses")
    low_dim = int(ctx.cfg.get("superand", {}).get("low_dim", 128))
    encoder = build_encoder(ctx, info, low_dim)
    init = sc.get("init", "superand")
    if init == "superand":
        if embed_ckpt is None:
            raise NcdError("twostage.init is 'superand' but no stage-1 checkpoint was given; "
                           "expected --embed <superand model.ckpt>")
        blob = load_model(embed_ckpt, expected={"kind": "superand", **encoder_arch(ctx, info, low_dim)})
        load_state_strict(encoder, sub_state(blob["state_dict"], "encoder"), f"stage-1 checkpoint {embed_ckpt}")
    elif init == "scratch":
        if embed_ckpt is not None:
            raise NcdError(f"twostage.init is 'scratch' but a stage-1 checkpoint ({embed_ckpt}) was given; "
                           "expected none, or init: superand")
    else:
        raise NcdError(f"unknown twostage.init {init!r}; expected 'superand' or 'scratch'")
    num_classes = int(sc.get("num_classes", 0)) or info.num_classes
    model = TwoStageModel(encoder, num_classes, int(sc["num_heads"]), float(sc.get("head_temperature", 0.1)),
                          sc.get("normalize", "row"))
    split = stage2_split(ctx, info)
    ds, views = train_views(ctx, info, build_dataset(dataset, ctx.data_root, split), sc.get("augment"))
    module = TwoStageModule(model, sc)
    module.views = views
    log.info("two-stage stage 2 on %s/%s: %d images, %d heads x %d classes, init %s, %d epochs, %s augmentation",
             dataset, split, len(ds), int(sc["num_heads"]), num_classes, init, sc["epochs"], augment_backend(ctx.cfg))
    fit(module, make_loader(ds, int(sc["batch_size"]), ctx, train=True), ctx, int(sc["epochs"]))
    module.close()
    best = module.best
    if best["state"] is None:
        raise NcdError("stage 2 finished without a complete training epoch; expected at least one")
    model.load_state_dict(best["state"])
    mi = best["mi_per_head"]
    best_head = int(np.argmin(mi))
    log.info("two-stage: kept epoch %d (mean training loss %.4f); best head %d (summed MI loss per head %s)",
             best["epoch"] + 1, best["loss"], best_head, [round(v, 3) for v in mi])
    arch = {"kind": "twostage", **encoder_arch(ctx, info, low_dim), "num_classes": num_classes,
            "num_heads": int(sc["num_heads"]), "head_temperature": float(sc.get("head_temperature", 0.1)),
            "normalize": sc.get("normalize", "row"), "split": split}
    save_model(out, model.state_dict(), arch,
               ctx.meta(best_head=best_head, best_epoch=best["epoch"], best_loss=best["loss"], mi_per_head=mi, init=init))
    finish(ctx)
