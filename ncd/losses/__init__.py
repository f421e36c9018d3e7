"""Losses: pure functions, tensors in, tensors out; no state, no I/O (DESIGN.md, Contracts).

SCAN (``ncd.losses.scan``): :func:`simclr_loss`, :func:`scan_loss`, :func:`confidence_ce`.
UNO (``ncd.losses.uno``): :func:`sinkhorn_knopp`, :func:`swapped_prediction`, :func:`uno_loss`.
Memory bank (``ncd.losses.memory``): :func:`memory_bank_update`.
"""

from ncd.losses.memory import memory_bank_update
from ncd.losses.scan import EmptyMaskError, confidence_ce, scan_loss, simclr_loss
from ncd.losses.uno import sinkhorn_knopp, swapped_prediction, uno_loss

__all__ = ["simclr_loss", "scan_loss", "confidence_ce", "EmptyMaskError",
           "sinkhorn_knopp", "swapped_prediction", "uno_loss", "memory_bank_update"]
