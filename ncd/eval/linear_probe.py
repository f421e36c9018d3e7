"""Linear probe on frozen features (Lightning): a single ``Linear(d → C)`` trained with SGD and
cross-entropy on the train features, evaluated on the test features (``linear_top1`` in the
metrics table). The protocol SeLa, CLD and the two-stage method report for ImageNet (METHODS.md
2.6, 5.7); here on features computed once, without augmentation and without 10-crop testing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ncd.errors import NcdError

__all__ = ["linear_probe", "LinearProbe"]

log = logging.getLogger("ncd")

NORMALIZATIONS = ("none", "l2", "standardize")


class LinearProbe(L.LightningModule):
    """``Linear(d → C)``; SGD (momentum, weight decay) with the lr divided by ``1/gamma`` at each
    milestone epoch."""

    def __init__(self, dim: int, num_classes: int, lr: float, momentum: float, weight_decay: float,
                 milestones: Sequence[int], gamma: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.milestones, self.gamma = list(milestones), gamma

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.fc(x), y)
        self.log("probe/loss", loss, on_step=False, on_epoch=True, batch_size=y.shape[0])
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def _features(x: Any, name: str) -> Tensor:
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 2 or not t.is_floating_point():
        raise NcdError(f"{name} must be a floating-point [N, d] matrix, got shape {tuple(t.shape)} dtype {t.dtype}")
    if t.shape[0] < 1:
        raise NcdError(f"{name} is empty")
    return t.float()


def _labels(y: Any, n: int, c: int, name: str) -> Tensor:
    t = y.detach().cpu() if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y))
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point():
        raise NcdError(f"{name} must be {n} integer class ids, got shape {tuple(t.shape)} dtype {t.dtype}")
    t = t.long()
    if int(t.min()) < 0 or int(t.max()) >= c:
        raise NcdError(f"{name} must lie in 0..{c - 1}, got [{int(t.min())}, {int(t.max())}]")
    return t


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, *, epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 0.0, milestones: Sequence[int] = (),
                 gamma: float = 0.1, normalize: str = "none", accelerator: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Train a linear classifier on frozen ``train_features`` and score it on ``test_features``.

    ``normalize``: ``"none"`` (the features as given), ``"l2"`` (unit rows) or ``"standardize"``
    (train mean/std per dimension, applied to both sets). Shuffling and the layer's init are seeded
    by ``seed`` without touching the global random state. Returns ``top1``, ``top5`` (fractions),
    ``predictions`` (int64 ``[n_test]``) and ``final_loss`` (the last epoch's mean training loss).
    """
    if normalize not in NORMALIZATIONS:
        raise NcdError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if int(num_classes) < 1:
        raise NcdError(f"num_classes must be >= 1, got {num_classes}")
    if int(epochs) < 1 or int(batch_size) < 1 or not lr > 0:
        raise NcdError(f"linear probe needs epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    xtr, xte = _features(train_features, "train_features"), _features(test_features, "test_features")
    if xtr.shape[1] != xte.shape[1]:
        raise NcdError(f"train and test features differ in dimension: {xtr.shape[1]} and {xte.shape[1]}")
    ytr = _labels(train_labels, xtr.shape[0], num_classes, "train_labels")
    yte = _labels(test_labels, xte.shape[0], num_classes, "test_labels")
    if normalize == "l2":
        xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    elif normalize == "standardize":
        mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(xtr.shape[1], int(num_classes), float(lr), float(momentum), float(weight_decay),
                            [int(m) for m in milestones], float(gamma))
        loader = DataLoader(TensorDataset(xtr, ytr), batch_size=min(int(batch_size), xtr.shape[0]), shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        quiet = logging.getLogger("lightning.pytorch")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            trainer = L.Trainer(accelerator=accelerator, devices=1, max_epochs=int(epochs), logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0)
            trainer.fit(probe, train_dataloaders=loader)
        finally:
            quiet.setLevel(level)
    final_loss = float(trainer.callback_metrics.get("probe/loss", float("nan")))
    probe.eval().cpu()
    with torch.no_grad():
        logits = probe(xte)
    ranked = logits.topk(min(5, int(num_classes)), dim=1).indices
    pred = ranked[:, 0]
    top5 = (ranked == yte[:, None]).any(1)
    return {"top1": float((pred == yte).double().mean()), "top5": float(top5.double().mean()),
            "predictions": pred, "final_loss": final_loss}
