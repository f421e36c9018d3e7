"""SeLa's label step: Sinkhorn-Knopp on ``P^λ`` (Asano, Rupprecht, Vedaldi, "Self-labelling via
simultaneous clustering and representation learning", ICLR 2020; official code
yukimasano/self-label: ``sinkhornknopp.optimize_L_sk`` and ``cifar.py``'s variant; METHODS.md 2.3).

The algebra, update order, scale and the every-10th-iteration error check are the official ones.
What differs is how the ``N × K`` matrix is held, never what is computed from it:

* the input is never modified (the official code raises it to the power λ in place);
* ``A = P^λ`` is built and swept in row chunks, and each Sinkhorn iteration is **one** pass over it
  (``c_new = (1/N) / (Aᵀ r)`` and the next ``A c_new`` from the same chunk while it is in cache)
  instead of the official two matrix-vector products, which halves the memory traffic; on the CPU
  each thread sweeps its own range of rows (results combined in a fixed order);
* ``storage`` says how ``A`` lives: ``float64`` (official), ``float32`` (half the memory; rows and
  columns rescaled so that every entry is in [0, 1] and every row and column has maximum 1, the
  products accumulated in float64), or ``recompute`` (not stored: each pass recomputes its chunks
  from the source, memory O(chunk · K)).

:func:`sela_sinkhorn` takes probabilities; :func:`sela_label_step` takes penultimate features and
a head's weights and forms each chunk's softmax itself, so the ``N × K`` probabilities are never
materialised (SeLa's multi-head trick, METHODS.md 2.2). :func:`label_step_plan` picks the storage
that fits a memory budget. The chunked solver itself lives in :mod:`ncd.ops.sinkhorn`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncd.errors import NcdError
from ncd.ops.sinkhorn import STORAGES, check_solver_params, label_step_plan, resolve_device, run_sinkhorn

__all__ = ["sela_sinkhorn", "sela_label_step", "sela_cost", "label_step_plan", "STORAGES"]


# ------------------------------------------------------------------------------------- checks
def _as_matrix(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(x)  # shares memory; nothing below writes to it
    elif isinstance(x, Tensor):
        t = x.detach()
    else:
        raise NcdError(f"{name} must be a NumPy array or a torch tensor, got {type(x).__name__}")
    if t.dim() != 2:
        raise NcdError(f"{name} must be a 2-D [N, K] matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise NcdError(f"{name} must be floating point (float64 as SeLa's code), got dtype {t.dtype}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise NcdError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    return t


# ------------------------------------------------------------------------------------ public API
def sela_sinkhorn(probs: Tensor | np.ndarray, lamb: float = 25.0, tol: float = 0.1, check_every: int = 10, *,
                  storage: str = "float64", chunk_size: int | None = None, device: Any = None,
                  return_info: bool = False):
    r"""SeLa's label assignment by Sinkhorn-Knopp (``optimize_L_sk``; Asano et al., ICLR 2020, eq. 7-8).

    For probabilities :math:`P \in \mathbb{R}^{N\times K}` (softmax outputs of one head) and
    :math:`A = (P^\top)^{\lambda}` (elementwise; = exp(λ log P): entropic optimal transport with cost
    −log P and regularisation 1/λ), starting from :math:`c = \mathbf{1}/N`:

    .. math::
        r \leftarrow \tfrac{1}{K} / (A c), \qquad c_{new} \leftarrow \tfrac{1}{N} / (A^\top r),\qquad
        \text{err} = \textstyle\sum_i |c_i / c_{new,i} - 1| \ \text{(only when the iteration counter is a multiple of
        check\_every)},\qquad c \leftarrow c_{new}

    until ``err <= tol``; then :math:`y_i = \arg\max_k (A_{ki} c_i) r_k`, the official products in their order.
    ``tol=0.1`` is the ImageNet code, ``tol=0.01`` (with λ = 10) the CIFAR script. The error is a NaN-ignoring
    sum as upstream; a cluster or sample whose ``P^λ`` is all zero (where the official code divides by
    zero) raises :class:`NcdError`.

    ``probs``: ``[N, K]`` NumPy array or tensor, float64 (float32 is promoted chunk by chunk); never
    modified. Runs on ``device`` (default: ``probs``' device; e.g. ``"cuda"`` for a NumPy input).
    Keyword options (see the module doc): ``storage`` ``"float64"`` (official) / ``"float32"`` /
    ``"recompute"``, ``chunk_size`` rows per chunk, ``return_info`` adds a dict with ``iterations``
    (the official ``_counter``), ``error``, timings and the matrix size.

    Returns ``(labels, r, c)``: int64 ``[N]``, float64 ``[K]`` and ``[N]`` (the final ``r`` and the
    final ``c = c_new``), on the device it ran on.
    """
    p = _as_matrix(probs, "probs")
    check_solver_params(lamb, tol, check_every, storage)
    dev = resolve_device(device, p)
    n, k = p.shape

    def source(i0: int, i1: int, out: Tensor | None = None) -> Tensor:
        if out is None:
            return p[i0:i1].to(device=dev, dtype=torch.float64, copy=True)
        return out.copy_(p[i0:i1])

    with torch.no_grad():
        return run_sinkhorn(source, n, k, lamb, tol, check_every, storage, dev, chunk_size, return_info,
                            "sela_sinkhorn")


def sela_label_step(features: Tensor | np.ndarray, weight: Tensor, bias: Tensor | None, lamb: float = 25.0,
                    tol: float = 0.1, check_every: int = 10, *, storage: str = "float64",
                    chunk_size: int | None = None, device: Any = None, return_info: bool = False):
    r"""SeLa's label step for one head from the stored penultimate features (METHODS.md 2.2).

    Each chunk's probabilities are formed in float64 as the official multi-head code does,
    :math:`P = \operatorname{softmax}(F W^\top + b)` with ``exp(x − logsumexp(x))`` (``py_softmax``), and
    handed to the same solver as :func:`sela_sinkhorn`, so ``[N, K]`` probabilities never exist at once.
    ``features`` ``[N, d]`` (float32 features are exact in float64, as the official code's cast),
    ``weight`` ``[K, d]``, ``bias`` ``[K]`` or None. Same options and return value as :func:`sela_sinkhorn`.
    """
    f = _as_matrix(features, "features")
    w = _as_matrix(weight, "weight")
    if w.shape[1] != f.shape[1]:
        raise NcdError(f"weight must be [K, d={f.shape[1]}] for features {tuple(f.shape)}, got {tuple(w.shape)}")
    check_solver_params(lamb, tol, check_every, storage)
    dev = resolve_device(device, f)
    wt = w.to(device=dev, dtype=torch.float64).t()
    b = None
    if bias is not None:
        b = (bias.detach() if isinstance(bias, Tensor) else torch.as_tensor(bias)).to(device=dev, dtype=torch.float64)
        if b.shape != (w.shape[0],):
            raise NcdError(f"bias must be [K={w.shape[0]}], got {tuple(b.shape)}")
    n, k = f.shape[0], w.shape[0]

    def source(i0: int, i1: int, out: Tensor | None = None) -> Tensor:
        logits = f[i0:i1].to(device=dev, dtype=torch.float64) @ wt
        if b is not None:
            logits += b
        logits -= torch.logsumexp(logits, dim=1, keepdim=True)
        return logits.exp_() if out is None else torch.exp(logits, out=out)

    with torch.no_grad():
        return run_sinkhorn(source, n, k, lamb, tol, check_every, storage, dev, chunk_size, return_info,
                            "sela_label_step")


def sela_cost(probs: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> Tensor:
    r"""The CIFAR script's label cost :math:`-\frac{1}{N}\sum_i \log P_{i, y_i}` (NaN terms ignored, as its
    ``nansum``; Asano et al., ICLR 2020). The script recovers :math:`P_{i,y_i}` from the scaled
    ``P^λ`` and takes ``log(·)/λ``; this is the same quantity computed from ``probs`` directly.
    Returns a float64 scalar tensor.
    """
    p = _as_matrix(probs, "probs")
    y = torch.from_numpy(labels) if isinstance(labels, np.ndarray) else labels
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != p.shape[0]:
        raise NcdError(f"labels must be a 1-D vector of N={p.shape[0]} cluster ids, got "
                       f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise NcdError(f"labels must be integer cluster ids, got dtype {y.dtype}")
    y = y.to(device=p.device, dtype=torch.long)
    if int(y.min()) < 0 or int(y.max()) >= p.shape[1]:
        raise NcdError(f"labels must lie in 0..{p.shape[1] - 1}, got [{int(y.min())}, {int(y.max())}]")
    picked = p.gather(1, y[:, None]).squeeze(1).to(torch.float64)
    return -torch.nansum(torch.log(picked)) / p.shape[0]
