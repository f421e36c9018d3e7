"""What every training stage shares: run context, optimisers, data loaders, the Lightning trainer
with atomic per-epoch checkpoints and a loss history."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ncd.checkpoint import load_state_strict
from ncd.data import build_dataset, build_transform
from ncd.data.wrappers import Transformed
from ncd.errors import NcdError, Preempted
from ncd.models import model_from_arch
from ncd.ops.checks import skip_value_checks
from ncd.stages import STAGES
from ncd.utils import atomic_path, config_hash, seed_everything, write_text_atomic

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
        return self.base[i]


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

#: Factories of extra callbacks every :func:`fit` adds (after its own): the GPU check
#: (``benchmarks/gpu_check.py``) times steps and stops runs through it. Empty in the pipeline.
EXTRA_CALLBACKS: list[Callable[[], L.Callback]] = []


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


class SeedEveryStep(L.Callback):
    """Reseeds every generator (torch CPU and CUDA, ``random``, NumPy) from ``(seed, epoch, batch, rank)``
    before each training step, and from ``(seed, epoch, phase, rank)`` before the epoch-level hooks.

    So every random draw of a step (dropout, noise, k-means inits, a label pass's shuffle) depends on
    where the step is, not on what ran before it in this process: a run resumed at any batch draws
    exactly what an uninterrupted one would. Registered first, so it runs before the other callbacks'
    and the module's hooks of the same name."""

    EPOCH_START, EPOCH_END, VALIDATION = -1, -2, -3

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def _seed(self, trainer: L.Trainer, *where: int) -> None:
        seed_everything(derive_seed(self.seed, trainer.current_epoch, *where, trainer.global_rank))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seed(trainer, self.EPOCH_START)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._seed(trainer, batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seed(trainer, self.VALIDATION)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seed(trainer, self.EPOCH_END)


class AtomicLastCheckpoint(L.Callback):
    """Writes ``last.ckpt`` at the end of every epoch (and every ``every_n_steps`` training batches
    when that is > 0) through a temp file and a rename, so a killed job resumes from the last save and
    never from a torn file."""

    def __init__(self, path: Path, cfg_hash: str, every_n_steps: int = 0) -> None:
        self.path = Path(path)
        self.cfg_hash = cfg_hash
        self.every_n_steps = int(every_n_steps)
        self.saves = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches  # the epoch-end save follows
        mid = os.environ.get(KILL_MID_EPOCH)
        if mid and trainer.current_epoch == int(mid) and batch_idx == max(0, trainer.num_training_batches // 2 - 1):
            self.save(trainer)
            log.warning("test hook %s: killed after epoch %d, batch %d", KILL_MID_EPOCH, trainer.current_epoch + 1,
                        batch_idx + 1)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.every_n_steps > 0 and not last_of_epoch and (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write last.ckpt now (every rank must call it: saving is a collective step under DDP)."""
        self.saves += 1
        if not trainer.is_global_zero:
            # only rank 0 writes; the others join the barrier
            trainer.save_checkpoint(self.path, weights_only=False)
            return
        with atomic_path(self.path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)
        # the sidecar says which config made last.ckpt, so a rerun with other params starts afresh
        write_text_atomic(_sidecar(self.path), self.cfg_hash + "\n")
        kill_at = os.environ.get(KILL_AFTER_SAVE)
        if kill_at and self.saves >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die at the worst moment, right after a save


class SaveOnSignal(L.Callback):
    """SIGUSR1 (SLURM's ``--signal=USR1@s``, sent ``s`` seconds before the time limit) or SIGTERM
    (preemption, ``scancel``): finish the current batch, write last.ckpt mid-epoch, raise
    :class:`Preempted`. The step exits non-zero; Snakemake's retry reruns it and ``fit`` resumes from
    that batch. Lightning's own SLURM auto-requeue is off (see ``fit``): requeueing behind
    Snakemake's back would leave it polling a job that restarted under the same id.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, last: AtomicLastCheckpoint) -> None:
        self.last = last
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def _stop_now(self, trainer: L.Trainer, batch_idx: int) -> bool:
        if trainer.world_size == 1:
            return self.received is not None
        # under DDP the ranks may see the signal at different batches and must stop together; agreeing
        # is a collective with a host sync, so it runs every `runtime.signal_sync_every` batches only
        every = int(getattr(trainer.lightning_module, "signal_sync_every", 16))
        last = batch_idx + 1 >= trainer.num_training_batches
        if (batch_idx + 1) % max(1, every) and not last:
            return False
        return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        at = os.environ.get(SIGNAL_AT_STEP)
        if at and trainer.is_global_zero and self.received is None and trainer.global_step >= int(at):
            signal.raise_signal(signal.SIGUSR1)  # test hook: the time-limit signal reaches rank 0 only
        mid = os.environ.get(SIGNAL_MID_EPOCH)
        if (mid and self.received is None and trainer.current_epoch == int(mid)
                and batch_idx == max(0, trainer.num_training_batches // 2 - 1)):
            signal.raise_signal(signal.SIGUSR1)  # test hook: the time-limit signal mid-epoch
        if not self._stop_now(trainer, batch_idx):
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        self.last.save(trainer)
        log.warning("received %s: saved %s at epoch %d, batch %d; stopping so that the retry resumes there",
                    name, self.last.path, trainer.current_epoch + 1, batch_idx + 1)
        raise Preempted(f"stopped by {name} at epoch {trainer.current_epoch + 1}, batch {batch_idx + 1}; "
                        f"{self.last.path} is saved and a rerun resumes from it")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".config")


class History(L.Callback):
    """Collects the epoch-level ``train/*`` and ``val/*`` metrics into ``history.csv``
    and a log line per epoch; its rows travel in last.ckpt so a resumed run keeps its curve."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch + 1}
        for k, v in trainer.callback_metrics.items():
            if k.startswith(("train/", "val/")):
                row[k.replace("/", "_")] = float(v)
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None:
            row["lr"] = opt.param_groups[0]["lr"]
        row = _mean_over_ranks(row)
        self.rows.append(row)
        log.info("epoch %d/%d %s", row["epoch"], trainer.max_epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if trainer.is_global_zero:
            self.write()

    def write(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))


def _mean_over_ranks(row: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that logged it (one object all-gather per epoch under DDP; a
    key only some ranks logged, e.g. a skipped-batch count, must not desynchronise anything)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return row
    rows: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return {k: (row[k] if k == "epoch" else
                sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r)) for k in keys}


def _wants_gpu(runtime: dict[str, Any]) -> bool:
    """Whether ``runtime.accelerator`` asks for a GPU (``auto``: when one is visible)."""
    acc = str(runtime.get("accelerator", "auto"))
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def _sync_batchnorm(runtime: dict[str, Any]) -> bool:
    """``runtime.sync_batchnorm``, on GPUs only: PyTorch's SyncBatchNorm has no CPU kernel, so DDP on
    the CPU (the multi-device tests) keeps BatchNorm per process."""
    if bool(runtime.get("sync_batchnorm", True)) and not _wants_gpu(runtime):
        log.warning("runtime.sync_batchnorm is on but the run is on the CPU, where SyncBatchNorm does not "
                    "exist: BatchNorm stays per process")
        return False
    return bool(runtime.get("sync_batchnorm", True))


def configure_backends(runtime: dict[str, Any]) -> None:
    """TF32 for float32 matrix products and convolutions on Ampere and later GPUs (``runtime.tf32``,
    default on, as PyTorch 1.7–1.11 did when the official code ran); no effect on the CPU."""
    tf32 = bool(runtime.get("tf32", True))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def fit(module: L.LightningModule, train_loader: DataLoader, ctx: RunContext, epochs: int,
        val_loader: DataLoader | None = None, *, precision: str | None = None) -> L.Trainer:
    """Train ``module`` for ``epochs`` epochs (validating after each one when ``val_loader`` is
    given), resuming from ``out_dir/last.ckpt`` if it was written under the same config.
    ``precision`` overrides ``runtime.precision`` (a stage block's own precision)."""
    rt = ctx.runtime
    configure_backends(rt)
    devices = int(rt.get("devices", 1))
    stage = STAGES.get(ctx.stage)
    if devices > 1 and stage is not None and not stage.multi_device:
        raise NcdError(f"stage '{ctx.stage}' trains on one device only (ncd/stages.py: multi_device is off); "
                       f"got runtime.devices={devices}, expected 1")
    module.signal_sync_every = int(rt.get("signal_sync_every", 16))
    cfg_hash = config_hash(ctx.cfg)
    last = ctx.out_dir / "last.ckpt"
    resume = last.is_file()
    if resume:
        side = _sidecar(last)
        if not side.is_file() or side.read_text().strip() != cfg_hash:
            # not deleted: under DDP every rank reads it here, and the first epoch's save replaces it
            log.warning("ignoring %s: it was written under another configuration", last)
            resume = False
    if resume and not readable_resume_checkpoint(last):
        resume = False
    history = History(ctx.out_dir / "history.csv")
    last_ckpt = AtomicLastCheckpoint(last, cfg_hash, int(rt.get("checkpoint_every_n_steps", 0)))
    trainer = L.Trainer(
        accelerator=rt.get("accelerator", "auto"),
        devices=devices,
        # several devices: DDP, with synchronised BatchNorm unless runtime.sync_batchnorm is off (UNO's
        # multi-GPU runs synchronise it; MoCo-style runs keep it per GPU and shuffle the key batch)
        **({"strategy": "ddp", "sync_batchnorm": _sync_batchnorm(rt)} if devices > 1 else {}),
        precision=precision or rt.get("precision", "32-true"),
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        # the reseeding first (its hooks run before the others'), then history: its rows go into the checkpoint
        callbacks=[SeedEveryStep(ctx.seed), history, last_ckpt, SaveOnSignal(last_ckpt)]
        + [make() for make in EXTRA_CALLBACKS],
        plugins=cluster_plugins(devices),
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val_loader is not None else 0,
        deterministic=bool(rt.get("deterministic", False)),
        benchmark=bool(rt.get("cudnn_benchmark", False)),
    )
    ckpt = None
    if resume:
        log.info("resuming stage %s from %s", ctx.stage, last)
        ckpt = str(last)
    # History averages the epoch metrics over the ranks itself (one gather per epoch), so Lightning's
    # advice to sync every logged value (a collective per metric) does not apply
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
    # a run resumed mid-epoch is exact (ResumableLoader, SeedEveryStep); Lightning cannot see that for
    # a loader it does not know, e.g. a test's plain DataLoader, and its warning says so
    with skip_value_checks(), torch.serialization.safe_globals(RESUME_SAFE_GLOBALS):
        # weights_only: last.ckpt may come from elsewhere (a shared folder, a pull) and must not run code
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt,
                    weights_only=True)
    return trainer


#: The few non-tensor types a last.ckpt holds besides containers and numbers (NumPy scalars in logged
#: values); everything else is refused by ``torch.load(weights_only=True)``.
RESUME_SAFE_GLOBALS: list = [getattr(np, "_core", np).multiarray.scalar, np.dtype,
                             *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)}]


def readable_resume_checkpoint(path: Path) -> bool:
    """Whether ``path`` loads as a resume checkpoint without running code. An unreadable one (torn by
    a full disk, corrupted, or a pickle with code in it) is moved aside to ``<name>.unreadable`` with a
    warning, and the stage starts afresh instead of failing on every rerun."""
    try:
        with torch.serialization.safe_globals(RESUME_SAFE_GLOBALS):
            blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "state_dict" not in blob or "loops" not in blob:
            raise ValueError("not a Lightning training checkpoint (no 'state_dict' and 'loops')")
    except Exception as e:  # noqa: BLE001 - any failure to read it means: do not resume from it
        if is_rank_zero():
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            log.warning("cannot resume from %s (%s: %s); moved it to %s and starting afresh", path,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", aside)
        return False
    return True


def cluster_plugins(devices: int) -> list:
    """Lightning's cluster environment for a training step.

    Under SLURM with one task per device (the rule's ``srun``), Lightning's SLURM environment sets
    up DDP from SLURM_NTASKS/SLURM_PROCID, with its auto-requeue off (:class:`SaveOnSignal` handles
    the time-limit signal). When one task holds every device (a multi-GPU job inside the
    container, where there is no ``srun``), Lightning starts the DDP processes itself.
    """
    if not SLURMEnvironment.detect():
        return []
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if devices > 1 and ntasks != devices:
        log.info("SLURM job step with %d task(s) for %d devices: Lightning starts the processes", ntasks, devices)
        return [LightningEnvironment()]
    return [SLURMEnvironment(auto_requeue=False)]


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
