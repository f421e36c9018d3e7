"""Training with Lightning: :func:`fit` (the trainer of every training stage) with atomic per-epoch
checkpoints (``last.ckpt``), save-and-stop on SLURM's time-limit signal or preemption, exact resume,
per-step reseeding and a loss history (``history.csv``).

Only training stages import this module (it imports Lightning, seconds of start-up); what an evaluator
or a stage that trains nothing needs is in :mod:`ncd.methods.common`."""

from __future__ import annotations

import csv
import io
import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from torch.utils.data import DataLoader

from ncd.errors import NcdError, Preempted
from ncd.methods.common import (
    KILL_AFTER_SAVE,
    KILL_MID_EPOCH,
    SIGNAL_AT_STEP,
    SIGNAL_MID_EPOCH,
    RunContext,
    _sidecar,
    _wants_gpu,
    configure_backends,
    derive_seed,
    is_rank_zero,
)
from ncd.ops.checks import skip_value_checks
from ncd.stages import STAGES
from ncd.utils import atomic_path, config_hash, seed_everything, write_text_atomic

log = logging.getLogger("ncd")

#: Factories of extra callbacks every :func:`fit` adds (after its own): the GPU check
#: (``benchmarks/gpu_check.py``) times steps and stops runs through it. Empty in the pipeline.
EXTRA_CALLBACKS: list[Callable[[], L.Callback]] = []


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


def _sync_batchnorm(runtime: dict[str, Any]) -> bool:
    """``runtime.sync_batchnorm``, on GPUs only: PyTorch's SyncBatchNorm has no CPU kernel, so DDP on
    the CPU (the multi-device tests) keeps BatchNorm per process."""
    if bool(runtime.get("sync_batchnorm", True)) and not _wants_gpu(runtime):
        log.warning("runtime.sync_batchnorm is on but the run is on the CPU, where SyncBatchNorm does not "
                    "exist: BatchNorm stays per process")
        return False
    return bool(runtime.get("sync_batchnorm", True))


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
    if bool(rt.get("channels_last", False)):
        # before the optimiser exists (configure_optimizers runs in trainer.fit): its state then
        # takes the parameters' layout, and a resumed run loads into the same layout
        module.to(memory_format=torch.channels_last)
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


__all__ = [
    "EXTRA_CALLBACKS",
    "RESUME_SAFE_GLOBALS",
    "AtomicLastCheckpoint",
    "History",
    "SaveOnSignal",
    "SeedEveryStep",
    "cluster_plugins",
    "fit",
    "readable_resume_checkpoint",
]
