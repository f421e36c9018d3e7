"""Input checks shared by the losses and the models: tensors, index vectors, positive numbers
and keyword options. Every failure is an :class:`NcdError` that names the value."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ncd.errors import NcdError

__all__ = ["check_tensor", "check_tensor_pair", "check_index", "check_positive", "check_options",
           "value_checks", "skip_value_checks"]

_VALUE_CHECKS = [True]


def value_checks() -> bool:
    """Whether checks that read tensor *values* (ranges, signs) run. They copy a result to the host,
    which stalls a GPU's queue; training loops turn them off (:func:`skip_value_checks`) since
    their inputs come from this package, not from a caller. Shape and dtype checks always run."""
    return _VALUE_CHECKS[-1]


@contextmanager
def skip_value_checks() -> Iterator[None]:
    """Within this block :func:`value_checks` is False (a training run's hot loop)."""
    _VALUE_CHECKS.append(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.pop()


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


def check_index(index: Any, length: int, size: int, name: str = "index", device: torch.device | None = None) -> Tensor:
    """An int32/int64 vector of ``length`` entries in ``0..size-1`` (rows of a memory), as int64 on
    ``device``; else :class:`NcdError` naming it."""
    index = torch.as_tensor(index, device=device)
    if index.dim() != 1 or index.shape[0] != length or index.dtype not in (torch.int64, torch.int32):
        raise NcdError(f"{name} must be an integer vector of length {length}, got shape {tuple(index.shape)} "
                       f"{index.dtype}")
    if index.numel() and value_checks() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise NcdError(f"{name} must lie in 0..{size - 1}, got [{int(index.min())}, {int(index.max())}]")
    return index.long()


def check_positive(value: float, name: str) -> float:
    """``value`` > 0 (NaN is not), as a float; else :class:`NcdError` naming it."""
    if not float(value) > 0:
        raise NcdError(f"{name} must be > 0, got {value}")
    return float(value)


def check_options(options: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Every key of ``options`` is one of ``allowed``, else :class:`NcdError` listing the unknown
    ones (sorted) and the allowed ones (``where`` says what they were given for)."""
    allowed = list(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise NcdError(f"unknown option(s) {', '.join(unknown)} for {where}; expected: "
                       + (", ".join(allowed) if allowed else "none"))
