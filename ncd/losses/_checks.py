"""Input checks shared by the loss modules."""

from __future__ import annotations

from torch import Tensor

from ncd.errors import NcdError


def check_tensor(x: Tensor, name: str, ndim: int) -> None:
    """A floating-point tensor with ``ndim`` dimensions, else :class:`NcdError` naming it."""
    if not isinstance(x, Tensor):
        raise NcdError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise NcdError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise NcdError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
