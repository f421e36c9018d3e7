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


def check_tensor_pair(a: Tensor, a_name: str, b: Tensor, b_name: str, ndim: int, layout: str = "") -> None:
    """Two floating-point tensors of ``ndim`` dimensions and the same shape, else :class:`NcdError`."""
    check_tensor(a, a_name, ndim)
    check_tensor(b, b_name, ndim)
    if a.shape != b.shape:
        layout = f" {layout}" if layout else ""
        raise NcdError(f"{a_name} and {b_name} must have the same shape{layout}, got "
                       f"{tuple(a.shape)} and {tuple(b.shape)}")
