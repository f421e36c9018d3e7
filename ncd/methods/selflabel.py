"""SCAN's self-labeling (SCAN 1.3, 1.5): confident weak-view predictions become targets for the
strong view; optional EMA with the official code's behaviour or a fixed one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ncd.checkpoint import load_model, load_state_strict, save_model
from ncd.data import build_dataset, get_info
from ncd.data.batched import RawImages, augment_backend
from ncd.data.batched_strong import device_views
from ncd.data.wrappers import Transformed, WeakStrong
from ncd.errors import NcdError
from ncd.eval.clustering import hungarian_evaluate
from ncd.losses import confidence_ce
from ncd.methods.common import RunContext, build_optimizer, complete, make_loader
from ncd.methods.training import fit
from ncd.models import ClusteringModel, model_from_arch

log = logging.getLogger("ncd")


class EMA:
    """Exponential moving average of the weights.

    ``mode="official"`` reproduces SCAN's code: the shadow holds a copy of the whole state
    (BN buffers included) but only parameters are averaged, and the shadow is written back
    into the live model after every step — so BN running statistics are reset to their values
    from before self-labeling at every step. ``mode="fixed"`` averages buffers too (copies the
    live ones) and leaves the live model alone; the EMA weights are used at the end.
    """

    def __init__(self, model: torch.nn.Module, alpha: float, mode: str = "official") -> None:
        if mode not in ("official", "fixed"):
            raise NcdError(f"unknown selflabel.ema.mode {mode!r}; expected 'official' or 'fixed'")
        self.alpha, self.mode = alpha, mode
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def to(self, device: torch.device) -> EMA:
        """Move the shadow weights to ``device`` (a resumed shadow is loaded on the CPU)."""
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[name].mul_(self.alpha).add_(p.detach(), alpha=1 - self.alpha)
        if self.mode == "official":
            model.load_state_dict(self.shadow)
        else:
            for name, b in model.named_buffers():
                self.shadow[name].copy_(b)


class SelfLabelModule(L.LightningModule):
    """Cross-entropy on the strong view against confident (> threshold) weak-view predictions."""

    def __init__(self, model: ClusteringModel, cfg: dict[str, Any], views: tuple[Any, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.views = views  # (weak view, strong view) of augment.backend batched; a tuple: no submodules
        self.ema: EMA | None = None
        self.skipped = 0
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # augment.backend batched: uint8 images with their keys → the weak and the strong view, on the device
        if self.views is not None and isinstance(batch[0], dict):
            item = batch[0]
            return (self.views[0](item["image"], item["key"]), self.views[1](item["image"], item["key"]), *batch[1:])
        return batch

    def on_fit_start(self) -> None:
        ema = self.cfg.get("ema", {})
        if ema.get("enabled", False) and self.ema is None:
            self.ema = EMA(self.model, float(ema.get("alpha", 0.999)), ema.get("mode", "official"))
        elif self.ema is not None:
            # restored from last.ckpt before Lightning moved the model to its device (AUDIT B1)
            self.ema.to(self.device)

    def training_step(self, batch, batch_idx: int):
        weak, strong = batch[0], batch[1]
        with torch.no_grad():
            w = self.model(weak)[0]
        thr = float(self.cfg.get("confidence_threshold", 0.99))
        confident = torch.softmax(w.float(), 1).max(1).values > thr
        # a host sync the official algorithm has too: its loss needs a non-empty mask (it raises otherwise)
        if not bool(confident.any()):
            # the official code raises here (issue #46); we skip the batch and count it
            self.skipped += 1
            self.log("train/skipped_batches", float(self.skipped), on_step=False, on_epoch=True, reduce_fx="max")
            if self._trainer is None or self.trainer.world_size == 1:
                return None
            # DDP cannot skip a step on one rank (the others wait in the gradient all-reduce):
            # this rank contributes a zero gradient instead
            return 0.0 * self.model(strong)[0].sum()
        s = self.model(strong)[0]
        loss = confidence_ce(w.float(), s.float(), threshold=thr, class_balance=bool(self.cfg.get("class_balance", True)))
        frac = confident.float().mean()
        b = weak.shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=b)
        self.log("train/confident_fraction", frac, on_step=False, on_epoch=True, batch_size=b)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # the EMA steps right after the optimizer, inside the batch: a checkpoint written at the end of
        # the batch (on_train_batch_end callbacks run before the module's hook) then holds it already
        skipped_before = self.skipped
        super().optimizer_step(*args, **kwargs)  # runs training_step (in the closure), then the update
        if self.ema is not None and (self.skipped == skipped_before or self.trainer.world_size > 1):
            self.ema.step(self.model)

    def validation_step(self, batch, batch_idx: int) -> None:
        # kept on the device: one copy to the host per validation pass, not one per batch
        self._val.append((self.model(batch[0])[0].argmax(1), torch.as_tensor(batch[1], device=self.device)))

    def on_validation_epoch_end(self) -> None:
        pred = torch.cat([p for p, _ in self._val])
        target = torch.cat([t for _, t in self._val])
        self._val = []
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank saw its share of the test split
            pred, target = self.all_gather(pred).flatten(0, 1), self.all_gather(target).flatten(0, 1)
        pred, target = pred.cpu(), target.cpu()
        if (target >= 0).all() and len(target):
            self.log("val/acc", float(hungarian_evaluate(pred, target)["acc"]), prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["selflabel"] = {"skipped": self.skipped, "ema": None if self.ema is None else self.ema.shadow}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("selflabel", {})
        self.skipped = st.get("skipped", 0)
        ema = self.cfg.get("ema", {})
        if st.get("ema") is not None:
            self.ema = EMA(self.model, float(ema.get("alpha", 0.999)), ema.get("mode", "official"))
            self.ema.shadow = st["ema"]

    def configure_optimizers(self):
        return build_optimizer(self.model.parameters(), self.cfg["optimizer"])


def run_selflabel(ctx: RunContext, scan_ckpt: Path, out: Path) -> None:
    """Self-label from the SCAN checkpoint's selected head (kept as head 0), final epoch saved."""
    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    blob = load_model(scan_ckpt, expected={"kind": "clustering", "backbone": ctx.cfg["backbone"]})
    scan_model = model_from_arch(blob["arch"])
    load_state_strict(scan_model, blob["state_dict"], f"SCAN checkpoint {scan_ckpt}")
    head = int(blob["meta"].get("best_head", 0))
    model = ClusteringModel(scan_model.backbone, scan_model.backbone_dim, blob["arch"]["num_clusters"], 1)
    model.cluster_head[0].load_state_dict(scan_model.cluster_head[head].state_dict())
    weak = ctx.transform("val", info)
    base = build_dataset(dataset, ctx.data_root, info.train_split)
    backend = augment_backend(ctx.cfg)
    views = None
    if backend == "batched":
        shared = dict(ctx.cfg.get("transform", {}))
        views = (device_views("val", info, **shared),
                 device_views("strong", info, seed=ctx.seed, view=0, **{**shared, **(sc.get("augment") or {})}))
        ds = RawImages(base)
    else:
        ds = WeakStrong(base, weak, ctx.transform("strong", info, sc.get("augment")))
    val_ds = Transformed(build_dataset(dataset, ctx.data_root, info.test_split), weak)
    module = SelfLabelModule(model, sc, views)
    log.info("self-labeling on %s from SCAN head %d: %d images, %d epochs, %s augmentation", dataset, head, len(ds),
             sc["epochs"], backend)
    fit(module, make_loader(ds, int(sc["batch_size"]), ctx, train=True), ctx, int(sc["epochs"]),
        val_loader=make_loader(val_ds, int(sc.get("eval_batch_size", 512)), ctx, train=False))
    if module.ema is not None and module.ema.mode == "fixed":
        model.load_state_dict(module.ema.shadow)
    if module.skipped:
        log.warning("%d batches had no prediction above the confidence threshold and were skipped", module.skipped)
    arch = {**blob["arch"], "num_heads": 1}
    complete(ctx, lambda: save_model(out, model.state_dict(), arch,
                                     ctx.meta(best_head=0, source_head=head, skipped_batches=module.skipped)))
