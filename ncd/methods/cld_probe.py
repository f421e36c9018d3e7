"""CLD's ImageNet linear probe as its own stage (METHODS.md 5.7): a linear classifier trained on the
frozen backbone of the ``cld`` stage's model, through :func:`ncd.methods.training.fit` (per-epoch
last.ckpt, save-and-exit on SIGUSR1/SIGTERM, resume), and its top-1 on the test split: the final
model's (``linear_top1``) and, with ``validate``, the best over the epochs' validations
(``linear_top1_selected_on_test``: MoCo's main_lincls.py reports ``best_acc1``). The probe's model
and its evaluation are in :mod:`ncd.methods.cld_probe_eval`."""

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
from ncd.methods.cld_probe_eval import KIND, ProbeModel, probe_from_arch
from ncd.methods.common import RunContext, complete, make_loader, restore
from ncd.methods.training import fit

log = logging.getLogger("ncd")


class LinearProbeModule(L.LightningModule):
    """Cross-entropy on ``fc`` over the frozen backbone: the backbone has no gradient and stays in
    eval mode (BatchNorm uses its running statistics and never updates them); SGD (momentum 0.9)
    on ``fc`` only, the learning rate multiplied by ``gamma`` at each epoch of ``milestones``.

    Given a validation loader (the test split), the top-1 is measured after every epoch (MoCo
    main_lincls.py: ``acc1 = validate(...)``, ``best_acc1 = max(acc1, best_acc1)``); the best value and
    its epoch live in buffers, so they travel in last.ckpt and a resumed run keeps them. Under DDP each
    rank validates a share and the shares are gathered (duplicates of the sampler's padding counted once).
    """

    def __init__(self, model: ProbeModel, pc: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.pc = model, pc
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        model.backbone.eval()
        self.register_buffer("best_top1", torch.full((), -1.0, dtype=torch.float64))
        self.register_buffer("best_epoch", torch.full((), -1, dtype=torch.long))
        self._val: list[tuple[Tensor, Tensor]] = []

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

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, idx = batch
        y = torch.as_tensor(y, device=x.device)
        hit = (self.model.fc(self.model.backbone(x)).argmax(1) == y).to(torch.uint8)  # uint8: NCCL gathers it
        self._val.append((torch.as_tensor(idx, device=x.device), hit))

    def on_validation_epoch_end(self) -> None:
        parts, self._val = self._val, []
        if not parts:
            return
        idx, hit = (torch.cat(p) for p in zip(*parts))
        if self.trainer.world_size > 1:  # every rank holds as many (padded) rows: gather them all
            idx, hit = self.all_gather(idx).flatten(), self.all_gather(hit).flatten()
        n = int(idx.max()) + 1
        seen = torch.zeros(n, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True)
        correct = torch.zeros(n, dtype=torch.uint8, device=idx.device)
        correct[idx] = hit  # a padded duplicate writes its own (identical) result again
        top1 = float(correct.sum()) / max(1, int(seen.sum()))
        self.log("val/top1", top1)
        if top1 > float(self.best_top1):  # main_lincls.py: is_best = acc1 > best_acc1 (ties keep the earlier)
            self.best_top1.fill_(top1)
            self.best_epoch.fill_(self.current_epoch)

    def best_meta(self) -> dict[str, Any] | None:
        """The best validation top-1 and its (1-based) epoch, for the checkpoint meta (``None``: never validated)."""
        if int(self.best_epoch) < 0:
            return None
        return {"best_top1": float(self.best_top1), "best_epoch": int(self.best_epoch) + 1}

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
    init_classifier(model.fc, pc.get("init", "moco"))
    module = LinearProbeModule(model, pc)
    train = Transformed(build_dataset(dataset, ctx.data_root, info.train_split),
                        build_cld_transform(pc["augmentation"], info))
    batch = _per_device_batch(ctx, int(pc["batch_size"]))
    loader = make_loader(train, batch, ctx, train=True)
    val = None
    if pc.get("validate", True):
        # main_lincls.py: the val loader (Resize 256 + CenterCrop 224) at the per-GPU batch size, after every epoch
        val = make_loader(Transformed(build_dataset(dataset, ctx.data_root, info.test_split),
                                      build_cld_transform("test", info)), batch, ctx, train=False)
    precision = pc.get("precision") or ctx.runtime.get("precision", "32-true")
    log.info("CLD linear probe on %s: %d images, %d classes, %d-d features, %d epochs, precision %s, init %s, "
             "validation every epoch %s", dataset, len(train), info.num_classes, dim, epochs, precision,
             pc.get("init", "moco"), "on" if val is not None else "off")
    with warnings.catch_warnings():  # Lightning warns about the trunk in eval mode: it is meant to be
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r".*validation_step.*no `val_dataloader`")
        fit(module, loader, ctx, epochs, val, precision=precision)
    arch = {"kind": KIND, "trunk": dict(blob["arch"]), "num_classes": int(info.num_classes), "backbone_dim": dim}
    best = module.best_meta()
    if best is not None:
        log.info("CLD linear probe: best validation top-1 %.4f at epoch %d", best["best_top1"], best["best_epoch"])
    complete(ctx, lambda: save_model(out, model.state_dict(), arch,
                                     ctx.meta(trunk_config_hash=blob["meta"].get("config_hash"), precision=precision,
                                              **({"probe_val": best} if best is not None else {}))))


def init_classifier(fc: nn.Linear, init: str) -> None:
    """``moco``: N(0, 0.01) weights and zero bias (MoCo main_lincls.py: ``fc.weight.data.normal_(0, 0.01)``,
    ``fc.bias.data.zero_()``); ``default``: PyTorch's own ``nn.Linear`` init, left as constructed
    (InfoMin's probe: PyContrast networks/build_linear.py builds a plain ``nn.Linear``)."""
    if init == "moco":
        nn.init.normal_(fc.weight, 0.0, 0.01)
        nn.init.zeros_(fc.bias)
    elif init != "default":
        raise NcdError(f"unknown cld_probe.init {init!r}; expected 'moco' or 'default'")


__all__ = ["KIND", "LinearProbeModule", "ProbeModel", "init_classifier", "probe_from_arch",
           "run_cld_probe"]
