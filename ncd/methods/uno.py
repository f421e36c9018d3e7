"""UNO (Fini et al., ICCV 2021; METHODS.md 3): supervised pretraining on the known classes, then
discovery with one unified swapped-prediction objective over known and novel classes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from ncd.checkpoint import load_model, save_model
from ncd.data import build_dataset, get_info
from ncd.data.batched import DeviceAugment, augment_backend
from ncd.data.batched_uno import build_uno_views
from ncd.data.uno import build_uno_transform
from ncd.errors import NcdError
from ncd.losses import uno_loss
from ncd.methods.common import RunContext, base_arch, build_optimizer, build_scheduler, complete, make_loader
from ncd.methods.training import fit
from ncd.methods.uno_eval import RawRelabeled, Relabeled, resolve_split
from ncd.models import build_backbone
from ncd.models.uno import MultiHeadModel

log = logging.getLogger("ncd")


class Paired(Dataset):
    """UNO's ImageNet discovery set (``DiscoverDataset`` in utils/data.py of UNO): item ``i`` is the pair
    (``labeled[i % L]``, ``unlabeled[i % U]``) and the length is ``max(L, U)``, so one epoch is one pass
    over the larger subset (the known classes on ImageNet) while the smaller one is cycled by index."""

    def __init__(self, labeled: Dataset, unlabeled: Dataset) -> None:
        if not len(labeled) or not len(unlabeled):
            raise NcdError(f"paired discovery batches need known- and novel-class training images; got "
                           f"{len(labeled)} known and {len(unlabeled)} novel")
        self.labeled, self.unlabeled = labeled, unlabeled

    def __len__(self) -> int:
        return max(len(self.labeled), len(self.unlabeled))

    def __getitem__(self, i: int):
        return self.labeled[i % len(self.labeled)], self.unlabeled[i % len(self.unlabeled)]

    def keyed_item(self, epoch: int, i: int):
        """The pair of keyed items (``augment.backend: batched``: :class:`RawRelabeled` subsets, each item
        keyed by its own image); PIL subsets draw from the generators SeededItems seeded instead."""
        if not hasattr(self.labeled, "keyed_item"):
            return self[i]
        return (self.labeled.keyed_item(epoch, i % len(self.labeled)),
                self.unlabeled.keyed_item(epoch, i % len(self.unlabeled)))


def collate_paired(items: list) -> tuple:
    """A batch of n :class:`Paired` items → one batch of 2n rows, the n labeled rows first: per crop
    ``cat(views_lab, views_unlab)``, the same for the targets (``unpack_batch`` of UNO's main_discover.py,
    done here so that the step, the logs and the throughput probes see one ordinary batch). The third
    column is each row's index within its own subset (known or novel)."""
    lab = default_collate([a for a, _ in items])
    unlab = default_collate([b for _, b in items])
    if isinstance(lab[0], dict):  # augment.backend batched: uint8 images and keys, views made on the device
        views = {k: torch.cat([lab[0][k], unlab[0][k]]) for k in lab[0]}
    elif isinstance(lab[0], torch.Tensor):
        views = torch.cat([lab[0], unlab[0]])
    else:
        views = [torch.cat([vl, vu]) for vl, vu in zip(lab[0], unlab[0])]
    return views, torch.cat([lab[1], unlab[1]]), torch.cat([lab[2], unlab[2]])


BATCHING = ("auto", "mixed", "paired")


def resolve_batching(dataset: str, batching: str = "auto") -> str:
    """``mixed`` (one shuffled loader over all classes, as UNO's CIFAR data module) or ``paired`` (half known,
    half novel per step, as its ImageNet one); ``auto`` picks what the official code does for the dataset:
    ``get_datamodule`` in utils/data.py of UNO switches on ``dataset == "ImageNet"``."""
    if batching not in BATCHING:
        raise NcdError(f"discover.batching must be one of {list(BATCHING)}, got {batching!r}")
    if batching != "auto":
        return batching
    return "paired" if str(dataset).startswith("imagenet") else "mixed"


def _optim(module: L.LightningModule, cfg: dict[str, Any]):
    opt = build_optimizer(module.parameters(), cfg["optimizer"])
    sched = build_scheduler(opt, cfg.get("scheduler", {}), int(cfg["epochs"]))
    return opt if sched is None else {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class UNOPretrain(DeviceAugment, L.LightningModule):
    """Cross-entropy on the labeled head, cosine logits / T, mean over the views (UNO 3.3)."""

    view_layout = "list"  # crops of two sizes: one tensor per crop, as the PIL path's loader

    def __init__(self, model: MultiHeadModel, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.model.normalize_prototypes()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views, y = batch[0], batch[1]
        logits = self.model(views)["logits_lab"] / float(self.cfg.get("temperature", 0.1))
        loss = torch.stack([F.cross_entropy(lv, y) for lv in logits]).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        return loss

    def configure_optimizers(self):
        return _optim(self, self.cfg)


class UNODiscover(DeviceAugment, L.LightningModule):
    """The unified objective; the best head is the one with the smallest summed cluster loss
    over the (last) training epoch. A batch is ``(views, targets, index)`` from either batching:
    paired batches arrive already concatenated (labeled rows first) by :func:`collate_paired`, and
    ``uno_loss`` runs Sinkhorn on the rows whose target is a novel class only."""

    view_layout = "list"

    def __init__(self, model: MultiHeadModel, cfg: dict[str, Any], num_labeled: int) -> None:
        super().__init__()
        self.model, self.cfg, self.nlc = model, cfg, num_labeled
        self.register_buffer("loss_per_head", torch.zeros(int(cfg["num_heads"])))

    def on_train_epoch_start(self) -> None:
        self.loss_per_head.zero_()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.model.normalize_prototypes()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views, y = batch[0], batch[1]
        out = self.model(views)
        c = self.cfg
        res = uno_loss(out["logits_lab"], out["logits_unlab"], out["logits_unlab_over"], y, self.nlc,
                       num_large_crops=int(c.get("num_large_crops", 2)), temperature=float(c.get("temperature", 0.1)),
                       epsilon=float(c.get("epsilon", 0.05)), iters=int(c.get("iters", 3)))
        self.loss_per_head += res["loss_per_head"].detach()
        b = y.shape[0]
        self.log("train/loss", res["loss"], on_step=False, on_epoch=True, prog_bar=True, batch_size=b)
        self.log("train/loss_cluster", res["loss_cluster"], on_step=False, on_epoch=True, batch_size=b)
        self.log("train/loss_overcluster", res["loss_overcluster"], on_step=False, on_epoch=True, batch_size=b)
        return res["loss"]

    def configure_optimizers(self):
        return _optim(self, self.cfg)


def _encoder(ctx: RunContext, info) -> tuple[torch.nn.Module, int]:
    return build_backbone(ctx.cfg["backbone"], info.channels, **ctx.cfg.get("backbone_kwargs", {}))


def _transforms(ctx: RunContext, info, cfg: dict[str, Any], small: int) -> list:
    """Two large crops and ``small`` small ones: PIL transforms, or with ``augment.backend: batched`` the
    view modules that make them on the training device (one per crop, each its own draws)."""
    aug = cfg.get("augment", {})
    if augment_backend(ctx.cfg) == "batched":
        kinds = ["large", "large"] + ["small"] * small
        return [build_uno_views(k, info, seed=ctx.seed, view=v, **aug) for v, k in enumerate(kinds)]
    large = build_uno_transform("large", info, **aug)
    return [large, large] + [build_uno_transform("small", info, **aug)] * small


def _relabeled(ctx: RunContext, base: Dataset, known: list[int], novel: list[int], transforms: list,
               classes: str = "all") -> Relabeled:
    if augment_backend(ctx.cfg) == "batched":
        return RawRelabeled(base, known, novel, classes)
    return Relabeled(base, known, novel, transforms, classes=classes)


def uno_arch(ctx: RunContext, info, dim: int, nlc: int, nuc: int, cfg: dict[str, Any] | None) -> dict[str, Any]:
    arch = base_arch(ctx, "uno", info.channels, dim, num_labeled=nlc, num_unlabeled=nuc, num_heads=0)
    if cfg is not None:
        arch.update(num_heads=int(cfg["num_heads"]), overcluster_factor=int(cfg["overcluster_factor"]),
                    hidden_dim=int(cfg["hidden_dim"]), proj_dim=int(cfg["proj_dim"]))
    return arch


def run_pretrain_supervised(ctx: RunContext, out: Path) -> None:
    """Supervised pretraining on the known classes' train images (two large crops)."""
    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    known, novel = resolve_split(ctx.cfg, ctx.data_root)
    backbone, dim = _encoder(ctx, info)
    model = MultiHeadModel(backbone, dim, len(known))
    transforms = _transforms(ctx, info, sc, 0)
    ds = _relabeled(ctx, build_dataset(dataset, ctx.data_root, info.train_split), known, novel, transforms, "known")
    module = UNOPretrain(model, sc)
    if augment_backend(ctx.cfg) == "batched":
        module.views = tuple(transforms)
    log.info("UNO pretraining on %d known classes of %s: %d images, %d epochs, %s augmentation", len(known), dataset,
             len(ds), sc["epochs"], augment_backend(ctx.cfg))
    fit(module, make_loader(ds, int(sc["batch_size"]), ctx, train=True), ctx, int(sc["epochs"]))
    model.normalize_prototypes()
    complete(ctx, lambda: save_model(out, model.state_dict(), uno_arch(ctx, info, dim, len(known), len(novel), None),
                                     ctx.meta(known=known, novel=novel)))


def discover_loader(ctx: RunContext, base: Dataset, known: list[int], novel: list[int],
                    transforms: list) -> tuple[DataLoader, str]:
    """The discovery training loader (per device) and a description for the log.

    ``mixed``: one shuffled loader over the images of every known and novel class, ``batch_size`` rows per
    step (UNO's ``DiscoverCIFARDataModule``). ``paired``: :class:`Paired` over the known- and novel-class
    subsets with ``batch_size // 2`` pairs, shuffled, last partial batch dropped, so each step has
    ``batch_size // 2`` known and as many novel rows (UNO's ``DiscoverImageNetDataModule.train_dataloader``,
    per GPU: ``--batch_size 256`` gives 128 + 128); under DDP Lightning swaps in a DistributedSampler over
    the pairs, as PL 1.1 did."""
    sc = ctx.stage_cfg
    bs = int(sc["batch_size"])
    if resolve_batching(ctx.cfg["dataset"], sc.get("batching", "auto")) == "mixed":
        ds = _relabeled(ctx, base, known, novel, transforms)
        return make_loader(ds, bs, ctx, train=True), f"mixed batches of {bs} from {len(ds)} images"
    if bs < 2:
        raise NcdError(f"discover.batch_size {bs} is too small for paired batches (half known, half novel); "
                       f"expected at least 2")
    lab = _relabeled(ctx, base, known, novel, transforms, "known")
    unlab = _relabeled(ctx, base, known, novel, transforms, "novel")
    loader = make_loader(Paired(lab, unlab), bs // 2, ctx, train=True)
    # a public DataLoader attribute, settable after construction (the loader is not rebuilt under DDP:
    # its EpochSampler already shards the pairs over the ranks)
    loader.collate_fn = collate_paired
    return loader, (f"paired batches of {bs // 2} known + {bs // 2} novel rows from {len(lab)} known and "
                    f"{len(unlab)} novel images (the smaller set cycled)")


def run_discover(ctx: RunContext, pretrain_ckpt: Path, out: Path) -> None:
    """Discovery from the pretrained encoder on the known- and novel-class train images, in mixed or
    paired batches (``discover.batching``, :func:`discover_loader`)."""
    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    known, novel = resolve_split(ctx.cfg, ctx.data_root)
    pre = load_model(pretrain_ckpt, expected={"kind": "uno", "backbone": ctx.cfg["backbone"], "in_channels": info.channels})
    backbone, dim = _encoder(ctx, info)
    arch = uno_arch(ctx, info, dim, len(known), len(novel), sc)
    model = MultiHeadModel(backbone, dim, len(known), len(novel), arch["num_heads"], arch["overcluster_factor"],
                           arch["hidden_dim"], arch["proj_dim"])
    # the official code drops every "unlab" key and loads the rest non-strictly
    state = {k: v for k, v in pre["state_dict"].items() if "unlab" not in k}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or any("unlab" not in k for k in result.missing_keys):
        raise NcdError(f"UNO pretraining checkpoint {pretrain_ckpt} does not fit: missing "
                       f"{[k for k in result.missing_keys if 'unlab' not in k][:3]}, unexpected {result.unexpected_keys[:3]}")
    small = int(sc.get("num_small_crops", 2)) if sc.get("multicrop", False) else 0
    transforms = _transforms(ctx, info, sc, small)
    loader, batches = discover_loader(ctx, build_dataset(dataset, ctx.data_root, info.train_split), known, novel,
                                      transforms)
    module = UNODiscover(model, sc, len(known))
    if augment_backend(ctx.cfg) == "batched":
        module.views = tuple(transforms)
    log.info("UNO discovery on %s: %d known + %d novel classes, %s, %d heads, %d small crops, %d epochs, %s "
             "augmentation", dataset, len(known), len(novel), batches, arch["num_heads"], small, sc["epochs"],
             augment_backend(ctx.cfg))
    trainer = fit(module, loader, ctx, int(sc["epochs"]))
    # every rank summed the loss of its own share of the epoch: the head is chosen on the total
    local = module.loss_per_head.clone()
    if trainer.world_size > 1:
        log.info("summed cluster loss per head over this rank's share: %s", [float(v) for v in local])
    losses = trainer.strategy.reduce(local, reduce_op="sum").cpu()
    best = int(torch.argmin(losses))
    log.info("UNO best head %d (summed cluster loss of the last epoch: %s)", best, [round(float(v), 3) for v in losses])
    complete(ctx, lambda: save_model(out, model.state_dict(), arch,
                                     ctx.meta(best_head=best, known=known, novel=novel, loss_per_head=losses.tolist())))
