"""What every stage shares and needs no Lightning for: the run context, seeds, data loaders (the
resumable training loader too), optimisers and schedules, artifact completion, the inference device,
restoring a checkpoint's model and the evaluation passes.

Evaluators and the stages that train nothing import only this module, so an ``evaluate`` job starts
without Lightning. The trainer with its atomic per-epoch checkpoints, signal handling and loss
history is :mod:`ncd.methods.training`; its names are also reachable here, imported on first use
(``from ncd.methods.common import fit`` works, and costs the Lightning import then)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ncd.checkpoint import load_state_strict
from ncd.data import build_dataset
from ncd.data.wrappers import Transformed
from ncd.errors import NcdError
from ncd.models import model_from_arch
from ncd.utils import config_hash

log = logging.getLogger("ncd")


@dataclass
class RunContext:
    """Everything a stage needs to know about the run it belongs to."""

    experiment: str
    seed: int
    stage: str
    cfg: dict[str, Any]           # the experiment's config block (dataset, backbone, stage blocks, runtime)
    data_root: Path
    out_dir: Path                 # results/{experiment}/seed{seed}/{stage}
    started: float = field(default_factory=time.time)

    @property
    def stage_cfg(self) -> dict[str, Any]:
        return self.cfg.get(self.stage, {})

    @property
    def runtime(self) -> dict[str, Any]:
        return self.cfg.get("runtime", {})

    def transform(self, kind: str, info, overrides: dict[str, Any] | None = None):
        """``build_transform`` with the experiment-wide ``transform`` options, then ``overrides``."""
        from ncd.data.transforms import build_transform

        return build_transform(kind, info, **{**self.cfg.get("transform", {}), **(overrides or {})})

    def meta(self, **extra: Any) -> dict[str, Any]:
        """Provenance stored in every model.ckpt."""
        return {"experiment": self.experiment, "seed": self.seed, "stage": self.stage,
                "config_hash": config_hash(self.cfg), "wall_time_s": time.time() - self.started, **extra}


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a fixed function of ``(seed, *keys)`` (SplitMix64 chained over the parts),
    so that e.g. seed 1's epoch 0 and seed 0's epoch 1 draw unrelated streams (unlike ``seed + epoch``)."""
    h = _splitmix64(int(seed) & _MASK64)
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


class SeededItems(Dataset):
    """Item ``(epoch, i)`` is ``base[i]`` drawn with every generator seeded from ``(seed, epoch, i)``.

    Each sample's augmentation is then a function of the seed, the epoch and the sample alone: the
    same in a resumed run as in an uninterrupted one, whichever worker process loads it and however
    many workers there are. (Generators are reseeded, not restored: the training loop reseeds them
    before every step, see :class:`SeedEveryStep`.)"""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        s = derive_seed(self.seed, epoch, i)
        # the CPU generator only (what CPU-side augmentation draws from): torch.manual_seed also seeds
        # every accelerator and costs ~100 µs, once per sample; the same CPU stream either way
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        keyed = getattr(self.base, "keyed_item", None)  # items that carry their key (batched augmentation)
        return keyed(epoch, i) if keyed is not None else self.base[i]


class EpochSampler(DistributedSampler):
    """The training order of one epoch: a permutation drawn from ``(seed, epoch)`` (or the identity when
    not shuffling), split over the DDP ranks as :class:`~torch.utils.data.DistributedSampler` does
    (padded to a multiple of the world size), yielding ``(epoch, index)`` for :class:`SeededItems`.

    A DistributedSampler subclass, so Lightning keeps it under DDP instead of injecting its own; the
    world size and rank are read when an epoch starts (the process group exists only inside ``fit``).
    ``skip`` indices at the start of the next epoch are passed over (a resumed epoch)."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=int(seed), drop_last=False)
        self.skip = 0

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def __len__(self) -> int:
        world, _ = self._world()
        return math.ceil(len(self.dataset) / world)

    def __iter__(self):
        world, rank = self._world()
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = math.ceil(n / world) * world
        order += (order * math.ceil(total / max(1, n)))[: total - n]  # pad, as DistributedSampler does
        mine = order[rank:total:world]
        epoch, skip, self.skip = self.epoch, self.skip, 0
        # materialised now, not lazily: with DataLoader workers the first indices are taken when the
        # iterator is created, and the epoch/skip must be those of that moment either way
        return iter([(epoch, i) for i in mine[skip:]])


class ResumableLoader(DataLoader):
    """A training DataLoader whose position Lightning saves in ``last.ckpt`` and restores on resume.

    Its state is the epoch of the current pass and how many batches of it were handed out; a resumed
    run skips exactly those (their indices, not their loading), and the rest of the epoch is the one
    an uninterrupted run would have seen. Lightning saves ``state_dict()`` with every checkpoint and
    calls ``load_state_dict`` before it iterates a resumed epoch (its ``_Stateful`` loaders)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError("ResumableLoader needs an EpochSampler")
        self._pass_epoch = 0
        self._handed_out = 0
        self._pending_skip = 0

    def __iter__(self):
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        skip, self._pending_skip = self._pending_skip, 0
        sampler.skip = skip * int(self.batch_size or 1)
        self._pass_epoch, self._handed_out = sampler.epoch, skip
        return self._count(super().__iter__())

    def _count(self, it):
        for batch in it:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch of the current pass and the batches of it handed to the training loop."""
        return {"epoch": int(self._pass_epoch), "batches": int(self._handed_out), "length": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume there: the rest of that epoch, or the next epoch if it was complete."""
        epoch, done = int(state["epoch"]), int(state["batches"])
        if int(state.get("length", len(self))) != len(self):
            raise NcdError(f"last.ckpt was saved with {state.get('length')} batches per epoch, this run has "
                           f"{len(self)}: the data changed; delete last.ckpt to start afresh")
        if done >= len(self):
            epoch, done = epoch + 1, 0
        self.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        self._pending_skip = done


def make_loader(ds: Dataset, batch_size: int, ctx: RunContext, train: bool, *, drop_last: bool | None = None,
                shuffle: bool | None = None) -> DataLoader:
    """Train loaders shuffle and drop the last partial batch (as SCAN's code); eval loaders don't.

    ``drop_last`` and ``shuffle`` override that default where an official loader differs (CLD's
    CIFAR loaders keep the last batch; SeLa's label pass reads the images shuffled).

    A training loader (``train=True``) is a :class:`ResumableLoader`: its order is drawn from (seed,
    epoch), each sample's augmentation from (seed, epoch, index), and its position travels in
    last.ckpt, so a resumed run is bit-identical to an uninterrupted one."""
    drop_last = train if drop_last is None else bool(drop_last)
    shuffle = train if shuffle is None else bool(shuffle)
    if train and drop_last and len(ds) < batch_size:
        raise NcdError(
            f"batch_size {batch_size} of stage '{ctx.stage}' is larger than its {len(ds)} training "
            f"images; expected a batch size of at most {len(ds)}"
        )
    workers = int(ctx.runtime.get("num_workers", 0))
    common = dict(batch_size=batch_size, drop_last=drop_last, num_workers=workers,
                  pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    if train:
        items = SeededItems(ds, ctx.seed)
        return ResumableLoader(items, sampler=EpochSampler(items, ctx.seed, shuffle=shuffle), **common)
    return DataLoader(ds, shuffle=shuffle, **common)


def build_optimizer(params, opt_cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or Adam, from a config block."""
    name = opt_cfg.get("name", "adam")
    lr, wd = float(opt_cfg["lr"]), float(opt_cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(opt_cfg.get("momentum", 0.9)),
                               weight_decay=wd, nesterov=bool(opt_cfg.get("nesterov", False)))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    raise NcdError(f"unknown optimizer {name!r}; expected 'sgd' or 'adam'")


def build_scheduler(opt: torch.optim.Optimizer, sched_cfg: dict[str, Any], epochs: int):
    """Per-epoch schedule: ``constant`` or SCAN's ``cosine``:
    lr_e = η_min + (lr − η_min)(1 + cos(π e / E)) / 2 with η_min = lr · eta_min_factor."""
    name = sched_cfg.get("name", "constant")
    if name == "constant":
        return None
    if name == "cosine":
        f = float(sched_cfg.get("eta_min_factor", 0.1**3))
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: f + (1 - f) * (1 + math.cos(math.pi * e / epochs)) / 2
        )
    if name == "warmup_cosine":
        # pl_bolts' LinearWarmupCosineAnnealingLR per epoch (UNO 3.5): linear from min_lr to lr over
        # the warmup epochs, then cosine down to min_lr at the last epoch
        base = opt.param_groups[0]["lr"]
        lo = float(sched_cfg.get("min_lr", 0.001)) / base
        warm = int(sched_cfg.get("warmup_epochs", 10))

        def factor(e: int) -> float:
            if e < warm:
                return lo + e * (1 - lo) / max(1, warm - 1)
            return lo + 0.5 * (1 - lo) * (1 + math.cos(math.pi * (e - warm) / max(1, epochs - warm)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    raise NcdError(f"unknown scheduler {name!r}; expected 'constant', 'cosine' or 'warmup_cosine'")


# Test hook (tests/test_stages.py): with this variable set to n, a stage kills itself with SIGKILL right
# after its n-th last.ckpt ("1": the first), as a cluster's OOM killer or a node failure would.
KILL_AFTER_SAVE = "NCD_TEST_KILL_AFTER_SAVE"

# Test hook (tests/test_stages.py): with this variable set to e, a stage saves last.ckpt after the middle
# batch of epoch e (0-based) and kills itself with SIGKILL right after: a node failure mid-epoch.
KILL_MID_EPOCH = "NCD_TEST_KILL_MID_EPOCH"


# Test hook (tests/methods/test_ddp.py): with this variable set to k, rank 0 raises SIGUSR1 on itself
# after its k-th training batch, as SLURM's time-limit signal reaching one rank first would.
SIGNAL_AT_STEP = "NCD_TEST_SIGNAL_AT_STEP"

# Test hook (tests/test_stages.py): with this variable set to e, the process raises SIGUSR1 on itself after
# the middle batch of epoch e (0-based): SLURM's time-limit signal arriving mid-epoch.
SIGNAL_MID_EPOCH = "NCD_TEST_SIGNAL_MID_EPOCH"


def is_rank_zero() -> bool:
    """True in the process that writes files: rank 0 of a DDP run, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def complete(ctx: RunContext, save: Callable[[], Any]) -> None:
    """End of a training stage: rank 0 writes the artifact (``save()``) and then removes the resume
    checkpoint; every rank waits for it, so no rank exits (and no srun task ends) before the
    artifact exists. Anything ``save`` needs from other ranks must be reduced before this call."""
    if is_rank_zero():
        save()
        finish(ctx)
    barrier()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".config")


def _wants_gpu(runtime: dict[str, Any]) -> bool:
    """Whether ``runtime.accelerator`` asks for a GPU (``auto``: when one is visible)."""
    acc = str(runtime.get("accelerator", "auto"))
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def configure_backends(runtime: dict[str, Any]) -> None:
    """TF32 for float32 matrix products and convolutions on Ampere and later GPUs (``runtime.tf32``,
    default on, as PyTorch 1.7–1.11 did when the official code ran); no effect on the CPU."""
    tf32 = bool(runtime.get("tf32", True))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def finish(ctx: RunContext) -> None:
    """Remove the resume checkpoint once model.ckpt is written: it has served its purpose (one
    process only: under DDP call :func:`complete`, which runs this on rank 0)."""
    last = ctx.out_dir / "last.ckpt"
    for p in (last, _sidecar(last)):
        if p.exists():
            p.unlink()


def inference_device(runtime: dict[str, Any]) -> torch.device:
    """The device eval passes run on: the GPU when the config allows it and one is present."""
    configure_backends(runtime)
    acc = str(runtime.get("accelerator", "auto"))
    if _wants_gpu(runtime):
        if not torch.cuda.is_available():
            raise NcdError(f"runtime.accelerator is {acc!r} but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def base_arch(ctx: RunContext, kind: str, in_channels: int, backbone_dim: int, **extra: Any) -> dict[str, Any]:
    """The ``arch`` block every checkpoint with one backbone starts from: its kind, the backbone and
    its kwargs, the input channels and the feature dimension, then the method's own ``extra`` keys."""
    return {"kind": kind, "backbone": ctx.cfg["backbone"], "in_channels": in_channels,
            "backbone_kwargs": dict(ctx.cfg.get("backbone_kwargs", {})), "backbone_dim": backbone_dim, **extra}


def single_device(ctx: RunContext, why: str) -> None:
    """Refuse ``runtime.devices`` > 1 for a stage that must see every sample in one process."""
    n = int(ctx.runtime.get("devices", 1))
    if n > 1:
        raise NcdError(f"stage '{ctx.stage}' runs on one device: {why}; got runtime.devices={n}, expected 1")


def restore(blob: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The model a checkpoint (:func:`ncd.checkpoint.load_model`) describes, with its weights, on
    ``device`` in eval mode."""
    model = model_from_arch(blob["arch"])
    load_state_strict(model, blob["state_dict"], f"checkpoint {blob.get('path', '')}".strip())
    return model.to(device).eval()


def eval_loader(ctx: RunContext, info, split: str, transform=None, batch_size: int | None = None) -> DataLoader:
    """An evaluation loader over ``split`` (a split name of ``info``): the val transform unless
    ``transform`` is given, ``evaluate.batch_size`` unless ``batch_size`` is."""
    t = ctx.transform("val", info) if transform is None else transform
    bs = int(ctx.cfg["evaluate"]["batch_size"]) if batch_size is None else batch_size
    return make_loader(Transformed(build_dataset(ctx.cfg["dataset"], ctx.data_root, split), t), bs, ctx, train=False)


def split_names(info) -> dict[str, str]:
    """The metrics table's split names → the dataset's split names."""
    return {"train": info.train_split, "test": info.test_split}


def eval_splits(ctx: RunContext) -> list[str]:
    """The splits of ``evaluate.splits`` (train and/or test), in the metrics table's names."""
    return list(ctx.cfg["evaluate"]["splits"])


@torch.no_grad()
def collect(fn, loader: DataLoader, device: torch.device, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn`` over an eval loader of ``(image, target, index)``; return (outputs, targets) on the CPU.

    ``fn`` returns a tensor whose *last but one* dimension is the batch (``[B, d]`` or ``[H, B, K]``).
    """
    outs, targets = [], []
    for x, y, _ in tqdm(loader, desc=desc, leave=False, mininterval=2.0):
        outs.append(fn(x.to(device, non_blocking=True)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(outs, dim=-2), torch.cat(targets)


# The Lightning side (ncd.methods.training), under its old address: imported when first asked for, never
# by an evaluator or a stage that trains nothing.
_TRAINING = frozenset({"EXTRA_CALLBACKS", "SeedEveryStep", "AtomicLastCheckpoint", "SaveOnSignal", "History", "fit",
                       "RESUME_SAFE_GLOBALS", "readable_resume_checkpoint", "cluster_plugins"})


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        from ncd.methods import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
