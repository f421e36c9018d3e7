"""Losses: pure functions, tensors in, tensors out; no state, no I/O (DESIGN.md, Contracts).

SCAN (``ncd.losses.scan``): :func:`simclr_loss`, :func:`scan_loss`, :func:`confidence_ce`.
UNO (``ncd.losses.uno``): :func:`sinkhorn_knopp`, :func:`swapped_prediction`, :func:`uno_loss`.
Memory bank (``ncd.losses.memory``): :func:`memory_bank_update`.
CLD (``ncd.losses.cld``): :func:`batch_kmeans`, :func:`cld_loss`, :func:`npid_loss`, :func:`moco_logits`,
:func:`enqueue`.
Two-stage classifier (``ncd.losses.twostage``): :func:`anchor_neighbourhoods`, :func:`super_and_loss`,
:func:`iic_loss`, :func:`cp_loss`, :func:`twostage_loss`.
SeLa (``ncd.losses.sela``): :func:`sela_sinkhorn`, :func:`sela_label_step`, :func:`sela_cost`,
:func:`label_step_plan` (the chunked solver itself is :mod:`ncd.ops.sinkhorn`).

Shared input checks live in :mod:`ncd.ops.checks`, below both the losses and the models.
"""

from ncd.losses.cld import batch_kmeans, cld_loss, enqueue, moco_logits, npid_loss
from ncd.losses.memory import memory_bank_update
from ncd.losses.scan import EmptyMaskError, confidence_ce, scan_loss, simclr_loss
from ncd.losses.sela import label_step_plan, sela_cost, sela_label_step, sela_sinkhorn
from ncd.losses.twostage import anchor_neighbourhoods, cp_loss, iic_loss, super_and_loss, twostage_loss
from ncd.losses.uno import sinkhorn_knopp, swapped_prediction, uno_loss

__all__ = ["simclr_loss", "scan_loss", "confidence_ce", "EmptyMaskError",
           "sinkhorn_knopp", "swapped_prediction", "uno_loss", "memory_bank_update",
           "batch_kmeans", "cld_loss", "npid_loss", "moco_logits", "enqueue",
           "anchor_neighbourhoods", "super_and_loss", "iic_loss", "cp_loss", "twostage_loss",
           "sela_sinkhorn", "sela_label_step", "sela_cost", "label_step_plan"]
