"""A chunked Sinkhorn-Knopp solver for SeLa's label step (the official ``optimize_L_sk``; Asano,
Rupprecht, Vedaldi, ICLR 2020; METHODS.md 2.3), and the memory plan that picks its storage.

The algebra, update order, scale and the every-``check_every``-th-iteration error check are the
official ones; what differs is how the ``N × K`` matrix ``A = P^λ`` is held, never what is computed
from it (see :mod:`ncd.losses.sela` for the whole story):

* ``A`` is built and swept in row chunks, and each iteration is **one** pass over it
  (``c_new = (1/N) / (Aᵀ r)`` and the next ``A c_new`` from the same chunk while it is in cache);
  on the CPU each thread sweeps its own range of rows (results combined in a fixed order);
* ``storage``: ``float64`` (official), ``float32`` (rows and columns rescaled into [0, 1], products
  accumulated in float64) or ``recompute`` (not stored: each pass recomputes its chunks).

:func:`run_sinkhorn` takes a ``source(i0, i1, out=None)`` that yields float64 probabilities of rows
``i0:i1``, so the caller decides whether they come from a matrix or are formed chunk by chunk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncd.errors import NcdError

__all__ = ["STORAGES", "label_step_plan", "check_solver_params", "resolve_device", "run_sinkhorn"]

log = logging.getLogger("ncd")

STORAGES = ("float64", "float32", "recompute")
#: CPU chunk: ~2 MiB of float64 rows, so the chunk read for ``Aᵀ r`` is still in cache for ``A c``.
_CPU_CHUNK_BYTES = 1 << 21
#: GPU chunk: large, the per-chunk launch overhead dominates below this.
_GPU_CHUNK_BYTES = 1 << 29
#: rows per block when the matrix is built (a few dozen MiB of temporaries).
_BUILD_BYTES = 1 << 25


# ------------------------------------------------------------------------------------- checks
def check_solver_params(lamb: float, tol: float, check_every: int, storage: str) -> None:
    """λ finite > 0, tol >= 0, check_every an integer >= 1 and a known storage, else :class:`NcdError`."""
    if isinstance(lamb, bool) or not isinstance(lamb, (int, float)) or not math.isfinite(lamb) or lamb <= 0:
        raise NcdError(f"lamb must be a finite number > 0, got {lamb!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise NcdError(f"tol must be a number >= 0, got {tol!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise NcdError(f"check_every must be an integer >= 1, got {check_every!r}")
    if storage not in STORAGES:
        raise NcdError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")


def resolve_device(device: Any, like: Tensor) -> torch.device:
    """``device`` as a torch device (default: ``like``'s); CUDA only where one is visible."""
    if device is None:
        return like.device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise NcdError(f"device {device!r} is not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NcdError(f"device {device!r} was asked for but no CUDA device is visible")
    return dev


def _chunk_rows(chunk_size: int | None, k: int, device: torch.device) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise NcdError(f"chunk_size must be an integer >= 1 (rows per chunk), got {chunk_size!r}")
        return chunk_size
    per = _GPU_CHUNK_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    return max(8, per // (8 * k))


def _spans(a: int, b: int, step: int) -> Iterator[tuple[int, int]]:
    """The row ranges ``(i0, i1)`` that cover ``a:b`` in steps of ``step``."""
    for i0 in range(a, b, step):
        yield i0, min(b, i0 + step)


# ------------------------------------------------------------------------------------ memory plan
def label_step_plan(n: int, k: int, memory_mb: float = 0, storage: str = "auto", feature_dim: int = 0,
                    chunk_size: int | None = None) -> dict[str, Any]:
    """How the label step holds its matrices, and what that costs in bytes.

    ``feature_dim`` > 0: the float32 ``[N, d]`` penultimate features are held too (the multi-head
    label step). ``storage="auto"`` picks the first of float64 (official), float32, recompute whose
    total fits ``memory_mb`` (0 = no limit: float64). Returns ``storage``, ``bytes`` (estimated
    peak), ``matrix_bytes``, ``feature_bytes``, ``workspace_bytes``; NcdError when nothing fits.
    """
    if storage != "auto" and storage not in STORAGES:
        raise NcdError(f"label step storage must be 'auto' or one of {', '.join(STORAGES)}, got {storage!r}")
    rows = min(n, max(chunk_size or 0, _BUILD_BYTES // (8 * k)))
    feature_bytes = 4 * n * feature_dim
    # chunk temporaries (a float64 feature chunk, its logits/P, the labels product) and the duals/labels vectors
    workspace = 8 * rows * (3 * k + feature_dim) + 8 * (3 * n + 2 * k)
    matrix = {"float64": 8 * n * k, "float32": 4 * n * k, "recompute": 0}
    budget = float(memory_mb) * 2**20
    order = STORAGES if storage == "auto" else (storage,)
    for s in order:
        total = feature_bytes + matrix[s] + workspace
        if budget <= 0 or total <= budget:
            return {"storage": s, "bytes": total, "matrix_bytes": matrix[s], "feature_bytes": feature_bytes,
                    "workspace_bytes": workspace}
    need = feature_bytes + matrix[order[-1]] + workspace
    raise NcdError(
        f"the label step for N={n}, K={k}" + (f", d={feature_dim}" if feature_dim else "")
        + f" needs at least {need / 2**20:.0f} MB with storage {order[-1]!r}, but the memory budget is "
        f"{memory_mb} MB; expected a larger sela.label_step.memory_mb (or storage 'recompute')"
    )


# -------------------------------------------------------------------------------- the solver
class _Workers:
    """Runs ``fn(i0, i1)`` over contiguous row ranges, one per CPU thread, and returns the results in range
    order (so every sum over them is taken in the same order: the result does not depend on timing).

    Each chunk's matrix-vector products are too small for the BLAS to spread over cores, and one core
    cannot read memory as fast as several: the CPU threads take a range of rows each. torch runs
    single-threaded inside them; its thread setting is restored afterwards. On a GPU: one range.
    """

    def __init__(self, n: int, rows: int, device: torch.device) -> None:
        self.n = n
        count = torch.get_num_threads() if device.type == "cpu" else 1
        count = max(1, min(count, -(-n // rows)))
        cuts = [min(n, round(i * n / count / rows) * rows) for i in range(count)] + [n]
        self.ranges = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        self.pool = ThreadPoolExecutor(len(self.ranges)) if len(self.ranges) > 1 else None

    def map(self, fn: Callable[[int, int], Any]) -> list[Any]:
        if self.pool is None:
            return [fn(0, self.n)]
        threads = torch.get_num_threads()
        try:
            futures = [self.pool.submit(self._single, fn, a, b) for a, b in self.ranges]
            return [f.result() for f in futures]
        finally:
            torch.set_num_threads(threads)

    def sum(self, fn: Callable[[int, int], Tensor]) -> Tensor:
        """The per-range results of ``fn`` added up, in range order."""
        return torch.stack(self.map(fn)).sum(0)

    @staticmethod
    def _single(fn: Callable[[int, int], Any], a: int, b: int) -> Any:
        torch.set_num_threads(1)
        return fn(a, b)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _Matrix:
    """``A = P^λ`` in one of the storages, read back in float64 chunks.

    ``source(i0, i1, out)`` writes (or returns, when ``out`` is None) the float64 probabilities of rows
    ``i0:i1`` on the device. For float32 storage the rescaling ``Â = A / (m_i M_k)`` is kept in
    ``col_scale`` (m_i, per sample: the row maximum of P^λ) and ``row_scale`` (M_k, per cluster), so
    every stored entry lies in [0, 1] and every row and column of ``Â`` has maximum 1.
    """

    def __init__(self, source: Callable[..., Tensor], n: int, k: int, lamb: float, storage: str,
                 device: torch.device, rows: int, workers: _Workers) -> None:
        self.source, self.n, self.k, self.lamb, self.storage = source, n, k, float(lamb), storage
        self.device, self.rows, self.workers = device, rows, workers
        self.col_scale: Tensor | None = None
        self.row_scale: Tensor | None = None
        self.data: Tensor | None = None
        build = max(rows, _BUILD_BYTES // (8 * k))
        if storage == "float64":
            self._build_float64(build)
        elif storage == "float32":
            self._build_float32(build)

    def _build_float64(self, build: int) -> None:
        self.data = torch.empty(self.n, self.k, dtype=torch.float64, device=self.device)

        def fill(a: int, b: int) -> None:
            for i0, i1 in _spans(a, b, build):
                self._power(i0, i1, out=self.data[i0:i1])

        self.workers.map(fill)

    def _build_float32(self, build: int) -> None:
        n, k, dev = self.n, self.k, self.device
        self.col_scale = torch.empty(n, dtype=torch.float64, device=dev)
        row_max = torch.zeros(k, dtype=torch.float64, device=dev)
        for i0, i1 in _spans(0, n, build):  # pass 1: the scales
            a = self._power(i0, i1)
            m = a.amax(dim=1)
            self._check_samples(m, i0)
            self.col_scale[i0:i1] = m
            torch.maximum(row_max, (a / m[:, None]).amax(dim=0), out=row_max)
        self._check_clusters(row_max)
        self.row_scale = row_max
        self.data = torch.empty(n, k, dtype=torch.float32, device=dev)
        for i0, i1 in _spans(0, n, build):  # pass 2: Â
            a = self._power(i0, i1)
            a /= self.col_scale[i0:i1, None]
            a /= row_max[None, :]
            self.data[i0:i1] = a

    def _power(self, i0: int, i1: int, out: Tensor | None = None) -> Tensor:
        p = self.source(i0, i1, out)
        lo, hi = torch.aminmax(p)  # NaN propagates into both
        if not (float(lo) >= 0 and math.isfinite(float(hi))):
            raise NcdError(f"probs rows {i0}..{i1 - 1} contain negative, NaN or infinite values; "
                           "expected non-negative finite probabilities")
        if p.device.type == "cpu" and p.is_contiguous():
            # NumPy's power: the official code's own values bit for bit, and faster than torch.pow here
            np.power(p.numpy(), self.lamb, out=p.numpy())
            return p
        return p.pow_(self.lamb)

    def _check_samples(self, col_max: Tensor, i0: int) -> None:
        bad = torch.nonzero(col_max <= 0)
        if bad.numel():
            raise NcdError(f"sample {i0 + int(bad[0])} has P^λ = 0 for every cluster (its probabilities are 0 or "
                           f"underflow at lamb={self.lamb:g}); expected a positive entry in every row of probs")

    def _check_clusters(self, row_total: Tensor) -> None:
        dead = torch.nonzero(row_total <= 0)
        if dead.numel():
            raise NcdError(f"cluster {int(dead[0])} has P^λ = 0 for every sample (probabilities 0 or underflow at "
                           f"lamb={self.lamb:g}); the official code would divide by zero here; expected a smaller lamb")

    def diagnose(self) -> None:
        """Name the all-zero sample or cluster behind non-finite duals (checked only on failure)."""
        col_tot = torch.zeros(self.k, dtype=torch.float64, device=self.device)
        for i0, i1 in _spans(0, self.n, self.rows):
            a = self.chunk(i0, i1)
            self._check_samples(a.amax(dim=1), i0)
            col_tot += a.sum(dim=0)
        self._check_clusters(col_tot)

    def chunk(self, i0: int, i1: int) -> Tensor:
        """float64 rows ``i0:i1`` of the stored matrix (rescaled for float32 storage)."""
        if self.storage == "float64":
            return self.data[i0:i1]
        if self.storage == "float32":
            return self.data[i0:i1].to(torch.float64)
        return self._power(i0, i1)

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


def _times(mat: _Matrix, c: Tensor, a: int, b: int) -> Tensor:
    """``A c`` over rows ``a:b``."""
    part = torch.zeros(mat.k, dtype=torch.float64, device=mat.device)
    for i0, i1 in _spans(a, b, mat.rows):
        part.addmv_(mat.chunk(i0, i1).t(), c[i0:i1])
    return part


def _fused(mat: _Matrix, r: Tensor, inv_n: Tensor, c_new: Tensor, a: int, b: int) -> Tensor:
    """``c_new = (1/N) / (Aᵀ r)`` over rows ``a:b`` (written into ``c_new``) and the next ``A c_new``."""
    part = torch.zeros(mat.k, dtype=torch.float64, device=mat.device)
    tmp = torch.empty(min(mat.rows, b - a), dtype=torch.float64, device=mat.device)
    for i0, i1 in _spans(a, b, mat.rows):
        x = mat.chunk(i0, i1)
        t = torch.mv(x, r, out=tmp[: i1 - i0])
        cn = torch.div(inv_n, t, out=c_new[i0:i1])
        part.addmv_(x.t(), cn)  # from the chunk while it is still in cache
    return part


def _assign(mat: _Matrix, c: Tensor, r: Tensor, labels: Tensor, a: int, b: int) -> None:
    """The official labels over rows ``a:b``: ``argmax_k (A_ki c_i) r_k``, the products in that order."""
    work = torch.empty(min(mat.rows, b - a), mat.k, dtype=torch.float64, device=mat.device)
    for i0, i1 in _spans(a, b, mat.rows):
        q = torch.mul(mat.chunk(i0, i1), c[i0:i1, None], out=work[: i1 - i0])
        torch.argmax(q.mul_(r[None, :]), dim=1, out=labels[i0:i1])


def _solve(mat: _Matrix, tol: float, check_every: int) -> dict[str, Any]:
    """Official iteration with fused passes; duals returned in the official (unscaled) form."""
    n, k, dev = mat.n, mat.k, mat.device
    f64 = torch.float64
    inv_k = torch.tensor(1.0 / k, dtype=f64, device=dev)  # 0-dim: true division, as NumPy's inv_K / x
    inv_n = torch.tensor(1.0 / n, dtype=f64, device=dev)
    c = torch.full((n,), 1.0 / n, dtype=f64, device=dev)
    if mat.col_scale is not None:
        c *= mat.col_scale  # ĉ = c ⊙ m
    c_new = torch.empty_like(c)
    r = torch.full((k,), 1.0 / k, dtype=f64, device=dev)

    s = mat.workers.sum(partial(_times, mat, c))
    mat._check_clusters(s)  # c > 0: an all-zero cluster is a zero entry here
    err, counter = 1e6, 0  # the official start: a tol >= 1e6 runs no iteration
    while err > tol:
        torch.div(inv_k, s, out=r)
        s = mat.workers.sum(partial(_fused, mat, r, inv_n, c_new))
        if counter % check_every == 0:
            err = float(torch.nansum(torch.abs(c / c_new - 1)))
        c, c_new = c_new, c
        counter += 1
    if not bool(torch.isfinite(r).all()) or not bool(torch.isfinite(c).all()):
        mat.diagnose()
        raise NcdError("Sinkhorn-Knopp produced non-finite duals (over/underflow of P^λ); expected a smaller lamb")
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    mat.workers.map(partial(_assign, mat, c, r, labels))
    if mat.row_scale is not None:
        r = r / mat.row_scale  # back from r̂ = r ⊙ M and ĉ = c ⊙ m to the official duals
        c = c / mat.col_scale
    return {"labels": labels, "r": r, "c": c, "iterations": counter, "error": err}


def run_sinkhorn(source: Callable[..., Tensor], n: int, k: int, lamb: float, tol: float, check_every: int,
                 storage: str, device: torch.device, chunk_size: int | None, return_info: bool, what: str):
    """Build ``A = P^λ`` from ``source`` in ``storage``, solve, and return ``(labels, r, c)`` (plus an info
    dict with ``iterations``, ``error``, timings, the matrix size and thread count when ``return_info``).

    ``source(i0, i1, out=None)`` returns (or writes into ``out``) the float64 probabilities of rows
    ``i0:i1`` on ``device``; ``what`` names the caller in the debug log. Parameters are checked by the
    caller (:func:`check_solver_params`); call under ``torch.no_grad()``.
    """
    t0 = time.perf_counter()
    rows = _chunk_rows(chunk_size, k, device)
    workers = _Workers(n, rows, device)
    try:
        mat = _Matrix(source, n, k, lamb, storage, device, rows, workers)
        t_build = time.perf_counter() - t0
        out = _solve(mat, tol, check_every)
    finally:
        workers.close()
    info = {"iterations": out["iterations"], "error": out["error"], "storage": storage, "chunk_size": rows,
            "matrix_bytes": mat.nbytes, "build_s": t_build, "seconds": time.perf_counter() - t0,
            "device": str(device), "threads": len(workers.ranges)}
    log.debug("%s: %d iterations, error %.4g, %.2f s (%s storage)", what, info["iterations"], info["error"],
              info["seconds"], storage)
    del mat
    result = (out["labels"], out["r"], out["c"])
    return (*result, info) if return_info else result
