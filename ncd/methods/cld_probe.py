"""CLD's ImageNet linear probe as its own stage (METHODS.md 5.7): a linear classifier trained on the
frozen backbone of the ``cld`` stage's model, through :func:`ncd.methods.common.fit` (per-epoch
last.ckpt, save-and-exit on SIGUSR1/SIGTERM, resume), and its top-1 on the test split."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ncd.checkpoint import load_model, save_model
from ncd.data import build_dataset, get_info
from ncd.data.cld import build_cld_transform
from ncd.data.wrappers import Transformed
from ncd.errors import NcdError
from ncd.eval.rows import Row
from ncd.methods.common import (
    RunContext,
    collect,
    complete,
    eval_loader,
    fit,
    make_loader,
    restore,
)
from ncd.models import model_from_arch, register_architecture

log = logging.getLogger("ncd")

KIND = "linear_probe"


class ProbeModel(nn.Module):
    """``fc(backbone(x))``: a CLD model's backbone and a linear classifier on its pooled features."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(int(backbone_dim), int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))


def probe_from_arch(arch: dict[str, Any]) -> ProbeModel:
    """The (untrained) probe of an ``arch`` block of kind ``linear_probe``: the CLD model of its
    ``trunk`` arch, of which only the backbone is kept, and the classifier."""
    return ProbeModel(model_from_arch(arch["trunk"]).backbone, int(arch["backbone_dim"]), int(arch["num_classes"]))


register_architecture(KIND, probe_from_arch)


class LinearProbeModule(L.LightningModule):
    """Cross-entropy on ``fc`` over the frozen backbone: the backbone has no gradient and stays in
    eval mode (BatchNorm uses its running statistics and never updates them); SGD (momentum 0.9)
    on ``fc`` only, the learning rate multiplied by ``gamma`` at each epoch of ``milestones``."""

    def __init__(self, model: ProbeModel, pc: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.pc = model, pc
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        model.backbone.eval()

    def train(self, mode: bool = True) -> LinearProbeModule:
        # Lightning (and DDP) may switch the whole module to train mode: the trunk stays in eval mode
        super().train(mode)
        self.model.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self.model.backbone.eval()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, _ = batch
        y = torch.as_tensor(y, device=x.device)
        with torch.no_grad():
            feats = self.model.backbone(x)
        logits = self.model.fc(feats).float()
        loss = F.cross_entropy(logits, y)
        b = y.shape[0]
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=b)
        self.log("train/acc", (logits.detach().argmax(1) == y).float().mean(), on_step=False, on_epoch=True,
                 batch_size=b)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        pc = self.pc
        opt = torch.optim.SGD(self.model.fc.parameters(), lr=float(pc["lr"]), momentum=0.9,
                              weight_decay=float(pc["weight_decay"]))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(m) for m in pc["milestones"]], float(pc["gamma"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _per_device_batch(ctx: RunContext, total: int) -> int:
    devices = max(1, int(ctx.runtime.get("devices", 1)))
    if total % devices:
        raise NcdError(f"cld_probe.batch_size {total} is the batch over all {devices} devices and must be a multiple "
                       f"of runtime.devices; expected e.g. {max(1, total // devices) * devices}")
    return total // devices


def run_cld_probe(ctx: RunContext, cld_ckpt: Path, out: Path) -> None:
    """Train the linear probe on the frozen backbone of ``cld_ckpt`` and write ``out`` (model.ckpt)."""
    pc = ctx.cfg["cld_probe"]
    epochs = int(pc["epochs"])
    if epochs < 1:
        raise NcdError("cld_probe.epochs is 0, so the probe stage is off; expected epochs >= 1 to run it")
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    blob = load_model(cld_ckpt, expected={"kind": "cld", "backbone": ctx.cfg["backbone"]})
    trunk = restore(blob, torch.device("cpu"))
    dim = int(trunk.backbone_dim)
    model = ProbeModel(trunk.backbone, dim, info.num_classes)
    nn.init.normal_(model.fc.weight, 0.0, 0.01)
    nn.init.zeros_(model.fc.bias)
    module = LinearProbeModule(model, pc)
    train = Transformed(build_dataset(dataset, ctx.data_root, info.train_split),
                        build_cld_transform(pc["augmentation"], info))
    loader = make_loader(train, _per_device_batch(ctx, int(pc["batch_size"])), ctx, train=True)
    precision = pc.get("precision") or ctx.runtime.get("precision", "32-true")
    log.info("CLD linear probe on %s: %d images, %d classes, %d-d features, %d epochs, precision %s", dataset,
             len(train), info.num_classes, dim, epochs, precision)
    with warnings.catch_warnings():  # Lightning warns about the trunk in eval mode: it is meant to be
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        fit(module, loader, ctx, epochs, precision=precision)
    arch = {"kind": KIND, "trunk": dict(blob["arch"]), "num_classes": int(info.num_classes), "backbone_dim": dim}
    complete(ctx, lambda: save_model(out, model.state_dict(), arch,
                                     ctx.meta(trunk_config_hash=blob["meta"].get("config_hash"), precision=precision)))


def evaluate_cld_probe(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict[str, Any]]:
    """``linear_top1``: top-1 of the probe on the test split (the ``test`` transform: Resize +
    CenterCrop on ImageNet); no confusion matrix."""
    if blob["arch"].get("kind") != KIND:
        raise NcdError(f"checkpoint {blob.get('path', '')} has kind {blob['arch'].get('kind')!r}; expected {KIND!r} "
                       "(the cld_probe stage's model.ckpt)")
    model = restore(blob, device)
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    loader = eval_loader(ctx, info, info.test_split, build_cld_transform("test", info))
    logits, y = collect(model, loader, device, "linear probe eval")
    return [("test", "best", "linear_top1", float((logits.argmax(1) == y).float().mean()))], {}


__all__ = ["KIND", "LinearProbeModule", "ProbeModel", "evaluate_cld_probe", "probe_from_arch", "run_cld_probe"]
