"""Losses: pure functions, tensors in, tensors out; no state, no I/O (DESIGN.md, Contracts).

SCAN (``ncd.losses.scan``): :func:`simclr_loss`, :func:`scan_loss`, :func:`confidence_ce`.
"""

from ncd.losses.scan import EmptyMaskError, confidence_ce, scan_loss, simclr_loss

__all__ = ["simclr_loss", "scan_loss", "confidence_ce", "EmptyMaskError"]
