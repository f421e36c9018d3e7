"""Model checkpoints: plain tensors + architecture description, loadable with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ncd.errors import NcdError, WriteError
from ncd.utils import atomic_path


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def save_model(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], arch: dict[str, Any],
               meta: dict[str, Any] | None = None) -> None:
    """Write ``{"arch", "state_dict", "meta"}`` to ``path`` atomically (temp file + rename).

    Only tensors, numbers, strings, lists and dicts go in, so ``torch.load(path,
    weights_only=True)`` reads it back without unpickling arbitrary objects.
    """
    blob = {
        "arch": dict(arch),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        try:
            torch.save(blob, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (full disk) this way
            raise WriteError(f"cannot write checkpoint {path}: {_first_line(e)} (is the disk full or the "
                             "folder read-only? nothing was written)") from e


def load_model(path: str | os.PathLike, expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_model` and check its architecture.

    ``expected`` maps arch keys (``backbone``, ``in_channels``, ``kind``, ...) to the values
    the caller's model needs; a mismatch raises :class:`NcdError` naming both.
    """
    path = Path(path)
    if not path.is_file():
        raise NcdError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a truncated or foreign file
        raise NcdError(f"checkpoint {path} is truncated, corrupt or not an ncd model checkpoint "
                       f"({_first_line(e)}); delete it and rerun the stage that writes it") from e
    if not isinstance(blob, dict) or not {"arch", "state_dict"} <= set(blob):
        raise NcdError(f"checkpoint {path} is not an ncd model checkpoint (expected keys 'arch' and 'state_dict')")
    for key, want in (expected or {}).items():
        got = blob["arch"].get(key)
        if got != want:
            raise NcdError(
                f"checkpoint {path} has {key}={got!r}, expected {key}={want!r} "
                f"(it was written for architecture {blob['arch']})"
            )
    blob.setdefault("meta", {})
    return blob


def load_state_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that fails loudly: SCAN users lost weeks to silently missing keys."""
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise NcdError(f"{what} does not fit the model: {e}") from e
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[:3]})")
    if problems:
        raise NcdError(f"{what} does not fit the model: " + "; ".join(problems))


def sub_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
