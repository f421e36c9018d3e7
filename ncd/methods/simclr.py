"""SimCLR pretext (SCAN's form) and the MoCo-v2 pretext that SCAN downloads for ImageNet."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchvision.datasets.utils import check_integrity, download_url

from ncd.checkpoint import load_state_strict, save_model, sub_state
from ncd.data import build_dataset, get_info
from ncd.data.batched import RawImages, SimCLRViews, apply_views, augment_backend, simclr_views
from ncd.data.wrappers import MultiView
from ncd.errors import NcdError
from ncd.losses import simclr_loss
from ncd.methods.common import RunContext, base_arch, build_optimizer, build_scheduler, complete, make_loader
from ncd.methods.training import fit
from ncd.models import ContrastiveModel, build_backbone

log = logging.getLogger("ncd")


class SimCLRModule(L.LightningModule):
    """Two SimCLR views per image through backbone + MLP head; SCAN's one-directional NT-Xent.

    With ``views`` (augment.backend: batched) the loader hands over uint8 images and their keys, and
    the views are made on the training device once the batch is there."""

    def __init__(self, model: ContrastiveModel, cfg: dict[str, Any],
                 views: list[SimCLRViews] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.views = views

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.views is not None and isinstance(batch[0], dict):
            return (apply_views(self.views, batch[0]), *batch[1:])
        return batch

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views = batch[0]                                   # [b, 2, C, H, W]
        b = views.shape[0]
        z = self.model(views.flatten(0, 1)).view(b, 2, -1)  # same interleaving as SCAN's code
        loss = simclr_loss(z, temperature=float(self.cfg.get("temperature", 0.1)))
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=b)
        return loss

    def configure_optimizers(self):
        opt = build_optimizer(self.model.parameters(), self.cfg["optimizer"])
        sched = build_scheduler(opt, self.cfg.get("scheduler", {}), int(self.cfg["epochs"]))
        if sched is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


def contrastive_arch(ctx: RunContext, backbone_dim: int, head: str, features_dim: int) -> dict[str, Any]:
    info = get_info(ctx.cfg["dataset"])
    return base_arch(ctx, "contrastive", info.channels, backbone_dim, head=head, features_dim=features_dim)


def run_pretrain(ctx: RunContext, out: Path) -> None:
    """Train the pretext model (or import MoCo weights) and write ``out`` (model.ckpt)."""
    sc = ctx.stage_cfg
    pretext = sc.get("pretext", "simclr")
    if pretext == "moco":
        return import_moco(ctx, out)
    if pretext != "simclr":
        raise NcdError(f"unknown pretext {pretext!r}; expected 'simclr' or 'moco'")
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    backbone, dim = build_backbone(ctx.cfg["backbone"], info.channels, **ctx.cfg.get("backbone_kwargs", {}))
    head, fdim = sc.get("head", "mlp"), int(sc.get("features_dim", 128))
    model = ContrastiveModel(backbone, dim, head=head, features_dim=fdim)
    base = build_dataset(dataset, ctx.data_root, info.pretrain_split)
    backend = augment_backend(ctx.cfg)
    views = None
    if backend == "batched":
        options = {**ctx.cfg.get("transform", {}), **(sc.get("augment") or {})}
        views = [simclr_views(info, seed=ctx.seed, view=k, **options) for k in range(2)]
        ds = RawImages(base)
    else:
        t = ctx.transform("simclr", info, sc.get("augment"))
        ds = MultiView(base, [t, t])
    log.info("SimCLR on %s/%s: %d images, backbone %s, %d epochs, %s augmentation", dataset, info.pretrain_split,
             len(ds), ctx.cfg["backbone"], sc["epochs"], backend)
    fit(SimCLRModule(model, sc, views), make_loader(ds, int(sc["batch_size"]), ctx, train=True), ctx,
        int(sc["epochs"]))
    complete(ctx, lambda: save_model(out, model.state_dict(), contrastive_arch(ctx, dim, head, fdim),
                                     ctx.meta(pretext="simclr")))


def import_moco(ctx: RunContext, out: Path) -> None:
    """Take the query encoder of a MoCo(-v2) checkpoint (a URL, downloaded once into the data
    folder, or a local file) as the pretext backbone; features are the normalised backbone
    outputs (SCAN 1.6: the contrastive head is replaced by Identity before mining)."""
    sc = ctx.stage_cfg
    src = str(sc.get("checkpoint", ""))
    if not src:
        raise NcdError("pretrain.pretext is 'moco' but pretrain.checkpoint is empty; expected a URL or a file path")
    if src.startswith(("http://", "https://")):
        folder = ctx.data_root.parent / "weights"  # beside the datasets, shared by experiments
        fname = src.rsplit("/", 1)[-1]
        md5 = sc.get("checkpoint_md5") or None
        if not check_integrity(str(folder / fname), md5):
            if not ctx.cfg.get("download", True):
                raise NcdError(f"MoCo checkpoint {folder / fname} is missing and downloads are off; "
                               f"set download: true or place the file there")
            download_url(src, str(folder), fname, md5)
        path = folder / fname
    else:
        path = Path(src)
        if not path.is_file():
            raise NcdError(f"MoCo checkpoint {path} does not exist; expected a file or an http(s) URL")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise NcdError(f"{path} is not a MoCo checkpoint (expected a dict with 'state_dict')")
    for prefix in ("module.encoder_q", "encoder_q", "module"):
        enc = sub_state(state, prefix)
        if enc:
            break
    else:
        enc = state
    enc = {k: v for k, v in enc.items() if not k.startswith("fc.")}
    info = get_info(ctx.cfg["dataset"], ctx.data_root)
    backbone, dim = build_backbone(ctx.cfg["backbone"], info.channels, **ctx.cfg.get("backbone_kwargs", {}))
    load_state_strict(backbone, enc, f"MoCo checkpoint {path}")
    model = ContrastiveModel(backbone, dim, head="identity")
    save_model(out, model.state_dict(), contrastive_arch(ctx, dim, "identity", dim),
               ctx.meta(pretext="moco", source=src))
    log.info("imported MoCo encoder from %s (%d tensors)", src, len(enc))
