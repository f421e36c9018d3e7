"""SCAN clustering (SCAN 1.3, 1.5): a multi-head cluster layer trained so that each image and
a mined neighbour agree, with an entropy term against collapse; the head and checkpoint with the
lowest validation SCAN loss are kept."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ncd.checkpoint import load_model, load_state_strict, save_model
from ncd.data import build_dataset, get_info
from ncd.data.batched import RawNeighbors, augment_backend
from ncd.data.batched_strong import device_views
from ncd.data.wrappers import NeighborsDataset, Transformed
from ncd.errors import NcdError
from ncd.eval.clustering import hungarian_evaluate, scan_head_losses
from ncd.losses import scan_loss
from ncd.methods.neighbors import load_neighbors
from ncd.methods.common import RunContext, build_optimizer, complete, make_loader
from ncd.methods.training import fit
from ncd.models import ClusteringModel, build_backbone

log = logging.getLogger("ncd")


class SCANModule(L.LightningModule):
    """Trains ``model`` with the summed per-head SCAN loss; validates every epoch on the test
    split's neighbours to select the head and the checkpoint (weight 1 entropy, as the code)."""

    def __init__(self, model: ClusteringModel, cfg: dict[str, Any], val_neighbors: np.ndarray | None,
                 views: tuple[Any, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.views = views  # (anchor view, neighbour view) of augment.backend batched; a tuple: no submodules
        self.head_only = bool(cfg.get("update_cluster_head_only", False))
        self.val_neighbors = None if val_neighbors is None else torch.as_tensor(val_neighbors)
        self.best_loss = float("inf")
        self.best_head = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self._val_probs: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []
        if self.head_only:
            for p in self.model.backbone.parameters():
                p.requires_grad_(False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # augment.backend batched: uint8 anchors and neighbours with their keys → both views, here on the device
        if self.views is not None and isinstance(batch[0], dict):
            item = batch[0]
            return (self.views[0](item["image"], item["key"]), self.views[1](item["neighbor"], item["key"]),
                    *batch[1:])
        return batch

    def on_train_epoch_start(self) -> None:
        if self.head_only:
            self.model.eval()  # the official code puts the whole model in eval mode

    def on_train_start(self) -> None:
        # also here: a run resumed mid-epoch gets no on_train_epoch_start from Lightning (2.6), and
        # the frozen backbone's BatchNorm must not update its statistics for the rest of that epoch
        self.on_train_epoch_start()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        anchors, neighbors = batch[0], batch[1]
        if self.head_only:
            with torch.no_grad():
                fa = self.model(anchors, forward_pass="backbone")
                fn = self.model(neighbors, forward_pass="backbone")
            la, ln = self.model(fa, forward_pass="head"), self.model(fn, forward_pass="head")
        else:
            la, ln = self.model(anchors), self.model(neighbors)
        w = float(self.cfg.get("entropy_weight", 5.0))
        parts = [scan_loss(a, n, entropy_weight=w) for a, n in zip(la, ln)]
        total = torch.stack([p[0] for p in parts]).sum()  # summed over heads, not averaged
        b = anchors.shape[0]
        self.log("train/loss", total, on_step=False, on_epoch=True, prog_bar=True, batch_size=b)
        self.log("train/consistency", torch.stack([p[1] for p in parts]).mean(), on_step=False, on_epoch=True, batch_size=b)
        self.log("train/entropy", torch.stack([p[2] for p in parts]).mean(), on_step=False, on_epoch=True, batch_size=b)
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, index = batch
        # kept on the device: one copy to the host per validation pass, not one per batch
        self._val_probs.append(torch.softmax(self.model(x).float(), dim=-1))
        self._val_targets.append(torch.as_tensor(y, device=self.device))
        self._val_index.append(torch.as_tensor(index, device=self.device))

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's validation outputs, in dataset order: ``[H, N, K]`` probabilities and targets."""
        probs = torch.cat(self._val_probs, dim=1)
        targets, index = torch.cat(self._val_targets), torch.cat(self._val_index)
        self._val_probs, self._val_targets, self._val_index = [], [], []
        if self._trainer is not None and self.trainer.world_size > 1:
            # each rank saw a share (a distributed sampler pads with repeats): place rows by index
            probs = self.all_gather(probs).permute(1, 0, 2, 3).flatten(1, 2)
            targets, index = self.all_gather(targets).flatten(), self.all_gather(index).flatten()
            n = int(index.max()) + 1
            placed = probs.new_zeros(probs.shape[0], n, probs.shape[2])
            placed[:, index] = probs
            ys = targets.new_zeros(n)
            ys[index] = targets
            probs, targets = placed, ys
        return probs.cpu(), targets.cpu()

    def on_validation_epoch_end(self) -> None:
        probs, targets = self._gathered()      # [H, N, K], [N]
        if self.val_neighbors is None or self.trainer.sanity_checking:
            return
        losses = scan_head_losses(probs, self.val_neighbors)
        head = int(losses["best_head"])
        lowest = float(losses["total"][head])
        self.log("val/scan_loss", lowest)
        self.log("val/best_head", float(head))
        if (targets >= 0).all():
            acc = hungarian_evaluate(probs[head].argmax(1), targets)["acc"]
            self.log("val/acc", float(acc), prog_bar=True)
        if lowest < self.best_loss:
            self.best_loss, self.best_head = lowest, head
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            log.info("new lowest validation SCAN loss %.4f (head %d)", lowest, head)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scan_best"] = {"loss": self.best_loss, "head": self.best_head, "state": self.best_state}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        best = checkpoint.get("scan_best", {})
        self.best_loss = best.get("loss", float("inf"))
        self.best_head = best.get("head", 0)
        self.best_state = best.get("state")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return build_optimizer(params, self.cfg["optimizer"])


def clustering_arch(pre_arch: dict[str, Any], num_clusters: int, num_heads: int) -> dict[str, Any]:
    arch = {k: pre_arch[k] for k in ("backbone", "in_channels", "backbone_kwargs", "backbone_dim") if k in pre_arch}
    return {**arch, "kind": "clustering", "num_clusters": num_clusters, "num_heads": num_heads}


def run_scan(ctx: RunContext, pretrain_ckpt: Path, neighbors: Path, out: Path) -> None:
    """SCAN stage: pretext backbone + fresh heads, trained on mined neighbours."""
    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    pre = load_model(pretrain_ckpt, expected={"kind": "contrastive", "backbone": ctx.cfg["backbone"],
                                              "in_channels": info.channels})
    arch = pre["arch"]
    backbone, dim = build_backbone(arch["backbone"], arch["in_channels"], **arch.get("backbone_kwargs", {}))
    load_state_strict(backbone, {k[len("backbone."):]: v for k, v in pre["state_dict"].items()
                                 if k.startswith("backbone.")}, f"pretext backbone {pretrain_ckpt}")
    k = int(sc.get("num_clusters") or info.num_classes)
    if k < 2:
        raise NcdError(f"scan.num_clusters is {k}; expected at least 2 (dataset {dataset!r} has {info.num_classes} classes)")
    heads = int(sc.get("num_heads", 1))
    model = ClusteringModel(backbone, dim, k, heads)
    aug = sc.get("augmentation", "strong")
    base = build_dataset(dataset, ctx.data_root, info.train_split)
    val_ds = Transformed(build_dataset(dataset, ctx.data_root, info.test_split), ctx.transform("val", info))
    nb = load_neighbors(neighbors, sizes={"train": len(base), "test": len(val_ds)})
    backend = augment_backend(ctx.cfg)
    views = None
    if backend == "batched":
        options = {**ctx.cfg.get("transform", {}), **(sc.get("augment") or {})}
        views = (device_views(aug, info, seed=ctx.seed, view=0, **options),
                 device_views(aug, info, seed=ctx.seed, view=1, **options))
        ds = RawNeighbors(base, nb["train"], int(sc.get("num_neighbors", 20)))
    else:
        t = ctx.transform(aug, info, sc.get("augment"))
        ds = NeighborsDataset(base, nb["train"], t, t, int(sc.get("num_neighbors", 20)))
    val_nb = nb["test"][:, : int(sc.get("num_neighbors_val", 5)) + 1]
    module = SCANModule(model, sc, val_nb, views)
    log.info("SCAN on %s: %d images, %d clusters, %d heads, %d epochs, %s %s augmentation", dataset, len(ds), k,
             heads, sc["epochs"], backend, aug)
    fit(module, make_loader(ds, int(sc["batch_size"]), ctx, train=True), ctx, int(sc["epochs"]),
        val_loader=make_loader(val_ds, int(sc.get("eval_batch_size", 512)), ctx, train=False))
    state = module.best_state or model.state_dict()
    complete(ctx, lambda: save_model(out, state, clustering_arch(arch, k, heads),
                                     ctx.meta(best_head=module.best_head, best_val_loss=module.best_loss)))
    log.info("SCAN done: head %d, lowest validation loss %.4f", module.best_head, module.best_loss)
