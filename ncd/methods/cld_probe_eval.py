"""The evaluation of CLD's linear probe stage (:mod:`ncd.methods.cld_probe`) and the probe's model, which
:func:`ncd.models.model_from_arch` rebuilds from a checkpoint's ``arch`` block (kind ``linear_probe``,
registered when this module is imported). No Lightning here, so that an evaluate job starts without it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ncd.data import get_info
from ncd.data.cld import build_cld_transform
from ncd.errors import NcdError
from ncd.eval.rows import Row, selected_on_test
from ncd.methods.common import RunContext, collect, eval_loader, restore
from ncd.models import model_from_arch, register_architecture

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


def evaluate_cld_probe(ctx: RunContext, blob: dict, device: torch.device) -> tuple[list[Row], dict[str, Any]]:
    """``linear_top1``: top-1 of the final probe on the test split (the ``test`` transform: Resize +
    CenterCrop on ImageNet) and, when the stage validated every epoch, ``linear_top1_selected_on_test``:
    the best of those validations (MoCo's ``best_acc1``, chosen on the test split); no confusion matrix."""
    if blob["arch"].get("kind") != KIND:
        raise NcdError(f"checkpoint {blob.get('path', '')} has kind {blob['arch'].get('kind')!r}; expected {KIND!r} "
                       "(the cld_probe stage's model.ckpt)")
    model = restore(blob, device)
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    loader = eval_loader(ctx, info, info.test_split, build_cld_transform("test", info))
    logits, y = collect(model, loader, device, "linear probe eval")
    rows: list[Row] = [("test", "best", "linear_top1", float((logits.argmax(1) == y).float().mean()))]
    best = blob["meta"].get("probe_val")
    if best:
        rows.append(("test", "best", selected_on_test("linear_top1"), float(best["best_top1"])))
    return rows, {}


__all__ = ["KIND", "ProbeModel", "evaluate_cld_probe", "probe_from_arch"]
