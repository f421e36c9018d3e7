"""CLD (Wang, Liu, Yu, CVPR 2021; METHODS.md 5): an instance-discrimination learner (NPID, MoCo,
MoCo v2 or InfoMin, chosen by ``cld.instance``) plus the cross-level instance-group term,
``loss = instance + λ · CLD``; ``λ = 0`` is the plain baseline from the same code.

One LightningModule (:class:`CLDModule`) trains every branch with manual optimisation, so that a
step whose loss is NaN is skipped (no backward, no optimiser or scheduler step, no memory update,
no EMA) and counted, as the official CIFAR loops do. Evaluation (:func:`ncd.methods.cld_eval.evaluate_cld`): weighted kNN
on the instance features recomputed with the test transform, k-means with Hungarian ACC/NMI/ARI on
them (beyond the official code), and the ImageNet linear probe (:func:`ncd.methods.cld_eval.linear_probe`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from ncd.checkpoint import save_model
from ncd.data import build_dataset, get_info
from ncd.data.batched import DeviceAugment, RawImages, augment_backend
from ncd.data.cld import CLDViews, build_cld_transform, build_cld_views, build_jigsaw_transform
from ncd.data.wrappers import Transformed
from ncd.errors import NcdError
from ncd.eval.knn import weighted_knn
from ncd.losses import cld_loss, enqueue, memory_bank_update, moco_logits, npid_loss
from ncd.methods.common import RunContext, base_arch, build_optimizer, complete, make_loader
from ncd.methods.training import fit
from ncd.models.cld import CLDModel, build_cld_backbone
from ncd.ops import npid_memory_init

log = logging.getLogger("ncd")

INSTANCES = ("npid", "moco", "mocov2", "infomin")
# Which views are the two queries (they also feed the group branch) and which is the key, as in
# the official loops: CIFAR MoCo x1, x2 | x3; MoCo v2 im_q, im_q2 = views 1, 3 | im_k = view 2;
# InfoMin x1, x2 | x3. NPID has no key encoder.
QUERY_VIEWS: dict[str, tuple[int, int]] = {"npid": (0, 1), "moco": (0, 1), "mocov2": (0, 2), "infomin": (0, 1)}
KEY_VIEW: dict[str, int | None] = {"npid": None, "moco": 2, "mocov2": 1, "infomin": 2}
SCHEDULES = ("warmup_cosine_iter", "cosine_epoch", "infomin_cosine", "multistep", "constant")
# The original baselines' view counts (cld.views): NPID's cifar.py trains on one view per image
# (lemniscate.pytorch cifar.py: net(inputs) → LinearAverage → CE); MoCo v2's main_moco.py on two
# crops, one query and one key (moco/loader.py TwoCropsTransform, moco/builder.py forward(im_q, im_k)).
SINGLE_QUERY_VIEWS: dict[str, int] = {"npid": 1, "moco": 2, "mocov2": 2}
KNN_TRAIN_FEATURES = ("recompute", "memory")
# Test hook (tests/methods/test_ddp.py): with this variable set to k, the last rank's loss becomes NaN
# at batch k of the first epoch, so that only one rank sees a non-finite loss.
NAN_AT_STEP = "NCD_TEST_NAN_AT_STEP"


def num_views(instance: str, views: int | None = None) -> int:
    """Views per image: ``views`` when given, else CLD's (two queries, plus a key with a key encoder)."""
    if views is not None:
        return int(views)
    return 3 if KEY_VIEW[instance] is not None else 2


def check_views(instance: str, views: int | None, lam: float) -> int:
    """The view count of ``cld.views`` for ``instance``: CLD's own, or the original baseline's single
    query (:data:`SINGLE_QUERY_VIEWS`, which needs λ = 0: CLD's term clusters two query views, and
    the official CLD loops have no path without the second one)."""
    n = num_views(instance, views)
    if n == num_views(instance):
        return n
    if SINGLE_QUERY_VIEWS.get(instance) != n:
        allowed = sorted({num_views(instance), SINGLE_QUERY_VIEWS.get(instance, num_views(instance))})
        raise NcdError(f"cld.views {views} does not fit cld.instance {instance!r}; expected one of "
                       f"{', '.join(map(str, allowed))} (or null)")
    if float(lam) != 0:
        raise NcdError(f"cld.views {views} (one query view, the original {instance} recipe) needs cld.lambda 0, got "
                       f"{lam}: the CLD term needs two query views")
    return n


def cld_lr(sched: dict[str, Any], base_lr: float, epochs: int, epoch: int, batch_idx: int, iters: int,
           step: int) -> float:
    """The learning rate of one optimiser step (METHODS.md 5.5).

    ``warmup_cosine_iter`` (CIFAR): per iteration, ``s`` = steps taken so far, ``W`` = warm-up
    steps: ``lr/mult · ((mult − 1)·s/W + 1)`` for ``s ≤ W`` (GradualWarmupScheduler), then
    ``η + (lr − η)(1 + cos(π (s − W)/((E − w)·I)))/2`` (CosineAnnealingLR, η = ``eta_min``).
    ``cosine_epoch`` (MoCo v2): ``lr · ½(1 + cos(π e/E))`` at 0-based epoch ``e``.
    ``infomin_cosine`` (InfoMin): ``η + (lr − η)(1 + cos(π e/E))/2`` at 1-based epoch ``e``, η = lr ·
    ``decay_rate``³, and during the first ``warmup_epochs`` a per-iteration ramp from ``warmup_from``
    to the value at the end of the warm-up. ``multistep`` (NPID's ``cifar.py`` ``adjust_learning_rate``:
    ×0.1 at 0-based epochs 120 and 160): ``lr · gamma^#{m ≤ e}``. ``constant``: ``lr``.
    """
    name = sched.get("name", "warmup_cosine_iter")
    if name == "constant":
        return base_lr
    if name == "multistep":
        passed = sum(1 for m in sched.get("milestones", (120, 160)) if epoch >= int(m))
        return base_lr * float(sched.get("gamma", 0.1)) ** passed
    if name == "warmup_cosine_iter":
        warm = int(sched.get("warmup_epochs", 5)) * iters
        mult = float(sched.get("warmup_multiplier", 100))
        eta = float(sched.get("eta_min", 1e-6))
        if warm > 0 and step <= warm:
            return base_lr / mult * ((mult - 1.0) * step / warm + 1.0)
        t_max = max(1, (epochs - int(sched.get("warmup_epochs", 5))) * iters)
        return eta + (base_lr - eta) * (1 + math.cos(math.pi * (step - warm) / t_max)) / 2
    if name == "cosine_epoch":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if name == "infomin_cosine":
        e = epoch + 1
        eta = base_lr * float(sched.get("decay_rate", 0.1)) ** 3
        warm = int(sched.get("warmup_epochs", 5))
        if warm > 0 and e <= warm:
            to = eta + (base_lr - eta) * (1 + math.cos(math.pi * warm / epochs)) / 2
            p = (batch_idx + (e - 1) * iters) / (warm * iters)
            start = float(sched.get("warmup_from", 0.01))
            return start + p * (to - start)
        return eta + (base_lr - eta) * (1 + math.cos(math.pi * e / epochs)) / 2
    raise NcdError(f"unknown cld scheduler {name!r}; expected one of {', '.join(SCHEDULES)}")


class KnnSplits(Dataset):
    """The train split then the test split, both with the test transform: ``(image, target, i)``
    with ``i < n_train`` for train images (the kNN monitor's one validation loader).
    ``train_rows=False``: the test split only, still numbered from ``n_train`` (the monitor takes
    the train features from NPID's memory bank)."""

    def __init__(self, train: Dataset, test: Dataset, *, train_rows: bool = True) -> None:
        self.train, self.test, self.train_rows = train, test, train_rows

    def __len__(self) -> int:
        return (len(self.train) if self.train_rows else 0) + len(self.test)

    def __getitem__(self, i: int):
        n = len(self.train)
        if not self.train_rows:
            i += n
        img, y, _ = self.train[i] if i < n else self.test[i - n]
        return img, y, i


class CLDModule(DeviceAugment, L.LightningModule):
    """``loss = instance + λ · CLD`` for one of the instance branches of :data:`INSTANCES`.

    NPID: two views, full-softmax memory bank (``memory`` ``[N, d]``, uniform in [−s, s],
    s = 1/√(d/3)); the loss is the mean of both views' CEs on the memory before the step, then
    the memory takes view 2, then view 1. MoCo / MoCo v2 / InfoMin: three views, two queries and
    one key from an EMA key encoder (parameters only, ``ema`` momentum, updated after every
    optimiser step); ``queue`` ``[Q, d]`` (uniform in [−s, s] for CIFAR MoCo, normalised Gaussian for
    MoCo v2 and InfoMin) takes the keys once per step (InfoMin's cache: after each query view);
    shuffle-BN for the key encoder when there is more than one device. InfoMin adds its jigsaw
    query: per view ``(1 − β)·InfoNCE(q) + β·InfoNCE(jigsaw)``.

    ``cfg["views"]`` = :data:`SINGLE_QUERY_VIEWS` (λ = 0): the original baselines' one query view.
    NPID: one view, its CE on the memory, then the memory takes that view (lemniscate's
    ``cifar.py`` with ``LinearAverage``); MoCo (v2): view 1 the query, view 2 the key, loss = its
    InfoNCE (``main_moco.py``, ``moco/builder.py``).

    The kNN monitor keeps every measurement in :attr:`knn_history` (saved in the checkpoint) and
    :attr:`knn_best` is its best epoch: the number the official CIFAR loops print as "best".
    """

    def __init__(self, model: CLDModel, cfg: dict[str, Any], num_train: int, num_classes: int = 0,
                 num_knn_train: int = 0, knn_k: int = 200, *, knn_train_labels: Tensor | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.cfg = model, cfg
        self.instance = cfg["instance"]
        if self.instance not in INSTANCES:
            raise NcdError(f"unknown cld.instance {self.instance!r}; expected one of {', '.join(INSTANCES)}")
        self.views = check_views(self.instance, cfg.get("views"), float(cfg["lambda"]))
        self.single_query = self.views != num_views(self.instance)
        self.knn_train_features = cfg.get("knn_train_features", "recompute")
        if self.knn_train_features not in KNN_TRAIN_FEATURES:
            raise NcdError(f"unknown cld.knn_train_features {self.knn_train_features!r}; expected one of "
                           f"{', '.join(KNN_TRAIN_FEATURES)}")
        if self.knn_train_features == "memory" and self.instance != "npid":
            raise NcdError(f"cld.knn_train_features 'memory' needs NPID's memory bank; cld.instance is {self.instance!r}")
        self.knn_train_labels = knn_train_labels
        if float(cfg["lambda"]) == 0:
            # the baseline never uses the group head: frozen, so that DDP does not wait for its gradient
            for p in model.group_head.parameters():
                p.requires_grad_(False)
        d = int(cfg["low_dim"])
        self.model_ema: CLDModel | None = None
        if self.instance == "npid":
            self.register_buffer("memory", npid_memory_init(num_train, d))
        else:
            self.model_ema = copy.deepcopy(model)
            for p in self.model_ema.parameters():
                p.requires_grad_(False)
            size = int(cfg["queue_size"])
            queue = npid_memory_init(size, d) if self.instance == "moco" else F.normalize(torch.randn(size, d), dim=1)
            self.register_buffer("queue", queue)
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("nan_steps", torch.zeros((), dtype=torch.long))
        self._ptr: int | None = None          # the queue pointer on the host (mirrors queue_ptr)
        self._shuffle_keys = False
        self.num_classes, self.num_knn_train, self.knn_k = num_classes, num_knn_train, knn_k
        self.knn_history: list[tuple[int, float]] = []
        self._knn_batches: list[tuple[Tensor, Tensor, Tensor]] = []

    # ------------------------------------------------------------------------------ helpers
    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _gather(self, x: Tensor) -> Tensor:
        """Concatenate ``x`` over all devices (rank order); ``x`` itself on one device."""
        return x if self._world() == 1 else self.all_gather(x).flatten(0, 1)

    def on_fit_start(self) -> None:
        # shuffle-BN only where BatchNorm is per GPU: with one device, or with synchronised BN, the key
        # encoder's BN sees the whole batch anyway and the shuffle would move images for nothing
        self._shuffle_keys = self.model_ema is not None and self._world() > 1 and not any(
            isinstance(m, torch.nn.SyncBatchNorm) for m in self.model_ema.modules())

    @torch.no_grad()
    def _keys(self, xk: Tensor) -> tuple[Tensor, Tensor]:
        """Keys of this device's batch and of all devices' batches (in rank order)."""
        assert self.model_ema is not None
        if not self._shuffle_keys:
            k = self.model_ema(xk, two_branch=False).float()
            return k, self._gather(k)
        x_all = self._gather(xk)
        n, b, r = x_all.shape[0], xk.shape[0], self.global_rank
        if self.instance == "moco":
            # CIFAR MoCo seeds the permutation with the (1-based) epoch: the same one all epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.current_epoch + 1))
            perm = perm.to(xk.device)
        else:
            perm = self.trainer.strategy.broadcast(torch.randperm(n, device=xk.device), src=0)
        k_shuffled = self._gather(self.model_ema(x_all[perm[r * b:(r + 1) * b]], two_branch=False).float())
        k_all = torch.empty_like(k_shuffled)
        k_all[perm] = k_shuffled
        return k_all[r * b:(r + 1) * b], k_all

    def _enqueue(self, keys: Tensor) -> None:
        # in place: DDP broadcasts the buffers it registered at wrap time, so a replaced tensor would
        # leave it sending a stale copy every forward (AUDIT B5); the pointer lives on the host
        if self._ptr is None:
            self._ptr = int(self.queue_ptr)
        _, self._ptr = enqueue(self.queue, keys, self._ptr, inplace=True)
        self.queue_ptr.fill_(self._ptr)

    @torch.no_grad()
    def _ema_update(self) -> None:
        m = float(self.cfg["ema"])
        for p, pe in zip(self.model.parameters(), self.model_ema.parameters()):
            pe.mul_(m).add_(p.detach(), alpha=1.0 - m)

    def _lr(self, batch_idx: int) -> float:
        c = self.cfg
        return cld_lr(c["scheduler"], float(c["optimizer"]["lr"]), int(c["epochs"]), self.current_epoch, batch_idx,
                      max(1, int(self.trainer.num_training_batches)), int(self.trainer.global_step))

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> None:
        x, _, index = batch
        patches = None
        if isinstance(x, (list, tuple)):
            x, patches = x
        c = self.cfg
        opt = self.optimizers()
        lr = self._lr(batch_idx)
        for g in opt.param_groups:
            g["lr"] = lr
        temperature = float(c["temperature"])
        if self.single_query:
            return self._single_query_step(x, index, opt, temperature, batch_idx)
        qa, qb = QUERY_VIEWS[self.instance]
        # one forward per view, as the official loops: BatchNorm normalises each view on its own
        fa, ga = (t.float() for t in self.model(x[:, qa]))
        fb, gb = (t.float() for t in self.model(x[:, qb]))
        zeros = torch.zeros(fa.shape[0], dtype=torch.long, device=fa.device)
        if self.instance == "npid":
            inst = 0.5 * (npid_loss(fa, index, self.memory, temperature) + npid_loss(fb, index, self.memory, temperature))
        else:
            k, k_all = self._keys(x[:, KEY_VIEW[self.instance]])
            if self.instance == "infomin":
                jig = self.model.forward_jigsaw(patches.flatten(0, 1)).float()
                beta = float(c["jigsaw_beta"])
                per_view = []
                for f in (fa, fb):
                    # a snapshot, as the official memories' `queue.clone()`: the backward needs the queue
                    # as it was, and the enqueue below writes into the buffer in place
                    queue = self.queue.clone()
                    per_view.append((1 - beta) * F.cross_entropy(moco_logits(f, k, queue, temperature), zeros)
                                    + beta * F.cross_entropy(moco_logits(jig, k, queue, temperature), zeros))
                    self._enqueue(k_all)  # InfoMin's cache takes the keys on every call
                inst = 0.5 * (per_view[0] + per_view[1])
            else:
                queue = self.queue.clone()  # the backward needs it as it was; the enqueue writes in place
                inst = 0.5 * (F.cross_entropy(moco_logits(fa, k, queue, temperature), zeros)
                              + F.cross_entropy(moco_logits(fb, k, queue, temperature), zeros))
                self._enqueue(k_all)  # in the forward pass, as the official: also on a skipped step
        loss = inst
        lam = float(c["lambda"])
        b = fa.shape[0]
        if lam > 0:
            out = cld_loss(ga, gb, int(c["num_clusters"]), float(c["cld_temperature"]), int(c["kmeans_iters"]),
                           detach_centroids=bool(c["detach_centroids"]))
            loss = inst + lam * out["loss"]
            self.log("train/loss_cld", out["loss"].detach(), on_step=False, on_epoch=True, batch_size=b)
            self.log("train/group_acc", out["group_acc"], on_step=False, on_epoch=True, batch_size=b)
        if not self._optimise(loss, opt, batch_idx, b):
            return None
        if self.instance == "npid":
            m = float(c["memory_momentum"])
            idx = self._gather(index)
            memory_bank_update(self.memory, self._gather(fb.detach()), idx, m, inplace=True)
            memory_bank_update(self.memory, self._gather(fa.detach()), idx, m, inplace=True)
        else:
            self._ema_update()
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=b)
        self.log("train/loss_instance", inst.detach(), on_step=False, on_epoch=True, batch_size=b)
        self.log("train/nan_steps", self.nan_steps.float(), on_step=False, on_epoch=True, reduce_fx="max", batch_size=b)
        return None

    def _single_query_step(self, x: Tensor, index: Tensor, opt, temperature: float, batch_idx: int) -> None:
        """The original baselines' step (λ = 0): one query view.

        NPID (lemniscate ``cifar.py``): ``features = net(inputs)``, CE of the full softmax over the
        memory, then the memory row of each image takes that view (``LinearAverageOp.backward``).
        MoCo / MoCo v2 (``moco/builder.py`` ``forward(im_q, im_k)``): view 1 the query, view 2 the key
        from the EMA encoder (shuffle-BN across devices), InfoNCE against the queue, which then takes
        the keys; the EMA follows the optimiser step (``_momentum_update_key_encoder`` before the next
        key)."""
        q = self.model(x[:, 0], two_branch=False).float()
        b = q.shape[0]
        if self.instance == "npid":
            loss = npid_loss(q, index, self.memory, temperature)
        else:
            k, k_all = self._keys(x[:, 1])
            queue = self.queue.clone()  # the backward needs it as it was; the enqueue writes in place
            zeros = torch.zeros(b, dtype=torch.long, device=q.device)
            loss = F.cross_entropy(moco_logits(q, k, queue, temperature), zeros)
            self._enqueue(k_all)
        if not self._optimise(loss, opt, batch_idx, b):
            return None
        if self.instance == "npid":
            memory_bank_update(self.memory, self._gather(q.detach()), self._gather(index),
                               float(self.cfg["memory_momentum"]), inplace=True)
        else:
            self._ema_update()
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=b)
        self.log("train/loss_instance", loss.detach(), on_step=False, on_epoch=True, batch_size=b)
        self.log("train/nan_steps", self.nan_steps.float(), on_step=False, on_epoch=True, reduce_fx="max", batch_size=b)
        return None

    def _optimise(self, loss: Tensor, opt, batch_idx: int, b: int) -> bool:
        """The backward and optimiser step, unless the loss is non-finite on some rank (then skipped)."""
        loss = self._nan_hook(loss, batch_idx)
        if not self._finite(loss, batch_idx, b):
            return False
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return True

    def _nan_hook(self, loss: Tensor, batch_idx: int) -> Tensor:
        at = os.environ.get(NAN_AT_STEP)
        if at and self.current_epoch == 0 and batch_idx == int(at) and self.global_rank == self._world() - 1:
            return loss * float("nan")  # test hook: a non-finite loss on the last rank only
        return loss

    def _finite(self, loss: Tensor, batch_idx: int, b: int) -> bool:
        """Whether the step goes ahead: the loss is finite on every rank; a skip is counted and logged."""
        # a host sync the official loops have too (they test the loss for NaN before the backward)
        finite = bool(torch.isfinite(loss.detach()))
        if self._world() > 1:
            # every rank must take the same branch: the backward all-reduces gradients (AUDIT B3)
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            self.nan_steps += 1
            log.warning("epoch %d batch %d: the loss is %s; step skipped (%d so far)", self.current_epoch + 1,
                        batch_idx + 1, float(loss.detach()), int(self.nan_steps))
            self.log("train/nan_steps", self.nan_steps.float(), on_step=False, on_epoch=True, reduce_fx="max",
                     batch_size=b)
        return finite

    def configure_optimizers(self):
        return build_optimizer(self.model.parameters(), self.cfg["optimizer"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cld_knn_history"] = [list(t) for t in self.knn_history]  # a resumed run keeps its monitor

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.knn_history = [(int(e), float(v)) for e, v in checkpoint.get("cld_knn_history", [])]

    @property
    def knn_best(self) -> tuple[int, float] | None:
        """``(epoch, top-1)`` of the monitor's best measurement (the earliest of equal ones), or None:
        what the official CIFAR loops report as "best accuracy", chosen on the test split. Derived from
        :attr:`knn_history`, which travels in the checkpoint, so a resumed run keeps it."""
        if not self.knn_history:
            return None
        return max(self.knn_history, key=lambda t: (t[1], -t[0]))

    # -------------------------------------------------------------------------- kNN monitor
    def _knn_due(self) -> bool:
        every = int(self.cfg["knn_every"])
        e = self.current_epoch + 1
        return every > 0 and (e % every == 0 or e == self.trainer.max_epochs)

    def validation_step(self, batch, batch_idx: int) -> None:
        if not self._knn_due():
            return
        x, y, i = batch
        self._knn_batches.append((self.model(x, two_branch=False).float(), torch.as_tensor(y, device=x.device), i))

    def on_validation_epoch_end(self) -> None:
        if not self._knn_batches:
            # NaN, not the last value: the history must not repeat an old measurement
            self.log("val/knn_top1", float("nan"))
            return
        f, y, i = (torch.cat(t) for t in zip(*self._knn_batches))
        self._knn_batches = []
        f, y, i = self._gather(f), self._gather(y), self._gather(i)
        # a distributed sampler pads with repeats: place every feature at its dataset index
        n = int(i.max()) + 1
        feats = f.new_zeros(n, f.shape[1])
        labels = y.new_zeros(n)
        feats[i], labels[i] = f, y
        nt = self.num_knn_train
        bank, bank_y = feats[:nt], labels[:nt]
        if self.knn_train_features == "memory":
            # NPID's cifar.py monitor (test.kNN, recompute_memory=0): the memory bank is the train features
            if self.knn_train_labels is None:
                raise NcdError("the kNN monitor on the memory bank needs the train labels (knn_train_labels)")
            bank, bank_y = self.memory.to(feats.dtype), self.knn_train_labels.to(labels.device)
        res = weighted_knn(bank, bank_y, feats[nt:], labels[nt:], self.num_classes,
                           k=min(self.knn_k, nt), sigma=float(self.cfg["temperature"]))
        self.knn_history.append((self.current_epoch + 1, float(res["top1"])))
        log.info("epoch %d: weighted kNN top-1 %.4f (top-5 %.4f)", self.current_epoch + 1, res["top1"], res["top5"])
        self.log("val/knn_top1", res["top1"], sync_dist=False)


# ----------------------------------------------------------------------------------- building
def cld_arch(ctx: RunContext, info, dim: int) -> dict[str, Any]:
    sc = ctx.stage_cfg if ctx.stage == "cld" else ctx.cfg["cld"]
    return base_arch(ctx, "cld", info.channels, dim, pool_len=int(sc["pool_len"]), low_dim=int(sc["low_dim"]),
                     head=sc["head"], mlp=bool(sc["mlp"]), jigsaw=sc["instance"] == "infomin", instance=sc["instance"])


def train_drop_last(instance: str, drop_last: bool | None) -> bool:
    """``cld.drop_last``, or the official loader's: MoCo v2's ``main_moco.py`` /
    ``main_imagenet_moco_cld.py`` drop the last partial batch (``drop_last=True``); CLD's CIFAR
    loaders (``datasets/dataloader.py``), NPID's ``cifar.py`` and InfoMin's loader
    (``datasets/infomin_datasets.py``) keep it. A last batch with fewer rows than ``num_clusters``
    is clustered as CLD's ``KMeans`` does it (:func:`ncd.losses.batch_kmeans`: every row its own
    cluster, zero centroids for the rest); the official code runs it without error."""
    return instance == "mocov2" if drop_last is None else bool(drop_last)


def build_model(ctx: RunContext, info) -> tuple[CLDModel, dict[str, Any]]:
    sc = ctx.cfg["cld"]
    # CLD's and NPID's CIFAR ResNet-18 (models/resnet_cifar.py) keep PyTorch's default init
    backbone, dim = build_cld_backbone(ctx.cfg["backbone"], info.channels, int(sc["pool_len"]),
                                       init=sc.get("backbone_init", "torch"), **ctx.cfg.get("backbone_kwargs", {}))
    arch = cld_arch(ctx, info, dim)
    return CLDModel(backbone, dim, arch["low_dim"], arch["head"], arch["mlp"], arch["jigsaw"]), arch


def run_cld(ctx: RunContext, out: Path) -> None:
    """Train CLD (or its λ = 0 baseline) on the train split and write ``out`` (model.ckpt)."""
    sc = ctx.stage_cfg
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    instance = sc["instance"]
    views = check_views(instance, sc.get("views"), float(sc["lambda"]))
    model, arch = build_model(ctx, info)
    backend = augment_backend(ctx.cfg)
    device_views = None
    if backend == "batched":
        if instance == "infomin":
            raise NcdError("cld.instance 'infomin' (jigsaw patches) has no batched augmentation; expected "
                           "augment.backend: pil, or instance 'npid' / 'mocov2'")
        device_views = tuple(build_cld_views(sc["augmentation"], info, seed=ctx.seed, view=k, **sc.get("augment", {}))
                             for k in range(views))
        ds = RawImages(build_dataset(dataset, ctx.data_root, info.train_split))
    else:
        aug = build_cld_transform(sc["augmentation"], info, **sc.get("augment", {}))
        jigsaw = build_jigsaw_transform(info) if instance == "infomin" else None
        ds = CLDViews(build_dataset(dataset, ctx.data_root, info.train_split), [aug] * views, jigsaw)
    bs = int(sc["batch_size"])
    val_loader, n_knn, knn_labels = None, 0, None
    if int(sc["knn_every"]) > 0:
        test_t = build_cld_transform("test", info)
        train_base = build_dataset(dataset, ctx.data_root, info.train_split)
        train_eval = Transformed(train_base, test_t)
        test_eval = Transformed(build_dataset(dataset, ctx.data_root, info.test_split), test_t)
        n_knn = len(train_eval)
        on_memory = sc.get("knn_train_features", "recompute") == "memory"
        if on_memory:
            knn_labels = torch.as_tensor(train_base.targets, dtype=torch.long)
        val_loader = make_loader(KnnSplits(train_eval, test_eval, train_rows=not on_memory),
                                 int(sc.get("eval_batch_size", 512)), ctx, train=False)
    module = CLDModule(model, sc, len(ds), info.num_classes, n_knn, int(ctx.cfg.get("evaluate", {}).get("knn_k", 200)),
                       knn_train_labels=knn_labels)
    module.views = device_views
    drop_last = train_drop_last(instance, sc.get("drop_last"))
    log.info("CLD (%s, λ = %g) on %s: %d images, %d views, backbone %s, %d epochs, drop_last %s, %s augmentation",
             instance, float(sc["lambda"]), dataset, len(ds), views, ctx.cfg["backbone"], sc["epochs"], drop_last,
             backend)
    fit(module, make_loader(ds, bs, ctx, train=True, drop_last=drop_last), ctx, int(sc["epochs"]), val_loader)
    nan = int(module.nan_steps)
    if nan:
        log.warning("CLD: %d training step(s) had a NaN loss and were skipped", nan)
    best = module.knn_best
    complete(ctx, lambda: save_model(out, model.state_dict(), arch,
                                     ctx.meta(instance=instance, nan_steps=nan,
                                              knn_history=[list(t) for t in module.knn_history],
                                              knn_best=list(best) if best is not None else None)))


__all__ = ["CLDModule", "INSTANCES", "SINGLE_QUERY_VIEWS", "build_model", "check_views", "cld_arch", "cld_lr", "run_cld",
           "train_drop_last"]
