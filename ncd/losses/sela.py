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
that fits a memory budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ncd.errors import NcdError

__all__ = ["sela_sinkhorn", "sela_label_step", "sela_cost", "label_step_plan", "STORAGES"]

log = logging.getLogger("ncd")

STORAGES = ("float64", "float32", "recompute")
#: CPU chunk: ~2 MiB of float64 rows, so the chunk read for ``Aᵀ r`` is still in cache for ``A c``.
_CPU_CHUNK_BYTES = 1 << 21
#: GPU chunk: large, the per-chunk launch overhead dominates below this.
_GPU_CHUNK_BYTES = 1 << 29
#: rows per block when the matrix is built (a few dozen MiB of temporaries).
_BUILD_BYTES = 1 << 25


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


def _check_params(lamb: float, tol: float, check_every: int, storage: str) -> None:
    if isinstance(lamb, bool) or not isinstance(lamb, (int, float)) or not math.isfinite(lamb) or lamb <= 0:
        raise NcdError(f"lamb must be a finite number > 0, got {lamb!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise NcdError(f"tol must be a number >= 0, got {tol!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise NcdError(f"check_every must be an integer >= 1, got {check_every!r}")
    if storage not in STORAGES:
        raise NcdError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")


def _resolve_device(device: Any, like: Tensor) -> torch.device:
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
            self.data = torch.empty(n, k, dtype=torch.float64, device=device)

            def fill(a: int, b: int) -> None:
                for i0 in range(a, b, build):
                    i1 = min(b, i0 + build)
                    self._power(i0, i1, out=self.data[i0:i1])

            workers.map(fill)
        elif storage == "float32":
            self.col_scale = torch.empty(n, dtype=torch.float64, device=device)
            row_max = torch.zeros(k, dtype=torch.float64, device=device)
            for i0 in range(0, n, build):  # pass 1: the scales
                i1 = min(n, i0 + build)
                a = self._power(i0, i1)
                m = a.amax(dim=1)
                self._check_samples(m, i0)
                self.col_scale[i0:i1] = m
                torch.maximum(row_max, (a / m[:, None]).amax(dim=0), out=row_max)
            self._check_clusters(row_max)
            self.row_scale = row_max
            self.data = torch.empty(n, k, dtype=torch.float32, device=device)
            for i0 in range(0, n, build):  # pass 2: Â
                i1 = min(n, i0 + build)
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
        for i0 in range(0, self.n, self.rows):
            a = self.chunk(i0, min(self.n, i0 + self.rows))
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


def _solve(mat: _Matrix, tol: float, check_every: int) -> dict[str, Any]:
    """Official iteration with fused passes; duals returned in the official (unscaled) form."""
    n, k, rows, dev = mat.n, mat.k, mat.rows, mat.device
    f64 = torch.float64
    inv_k = torch.tensor(1.0 / k, dtype=f64, device=dev)  # 0-dim: true division, as NumPy's inv_K / x
    inv_n = torch.tensor(1.0 / n, dtype=f64, device=dev)
    c = torch.full((n,), 1.0 / n, dtype=f64, device=dev)
    if mat.col_scale is not None:
        c *= mat.col_scale  # ĉ = c ⊙ m
    c_new = torch.empty_like(c)
    r = torch.full((k,), 1.0 / k, dtype=f64, device=dev)

    def times_c(a: int, b: int) -> Tensor:  # A c over rows a:b
        part = torch.zeros(k, dtype=f64, device=dev)
        for i0 in range(a, b, rows):
            i1 = min(b, i0 + rows)
            part.addmv_(mat.chunk(i0, i1).t(), c[i0:i1])
        return part

    def fused(a: int, b: int) -> Tensor:  # c_new = (1/N) / (Aᵀ r) and the next A c_new, over rows a:b
        part = torch.zeros(k, dtype=f64, device=dev)
        tmp = torch.empty(min(rows, b - a), dtype=f64, device=dev)
        for i0 in range(a, b, rows):
            i1 = min(b, i0 + rows)
            x = mat.chunk(i0, i1)
            t = torch.mv(x, r, out=tmp[: i1 - i0])
            cn = torch.div(inv_n, t, out=c_new[i0:i1])
            part.addmv_(x.t(), cn)  # from the chunk while it is still in cache
        return part

    def assign(a: int, b: int) -> None:  # the official labels: argmax_k (A_ki c_i) r_k, products in that order
        work = torch.empty(min(rows, b - a), k, dtype=f64, device=dev)
        for i0 in range(a, b, rows):
            i1 = min(b, i0 + rows)
            q = torch.mul(mat.chunk(i0, i1), c[i0:i1, None], out=work[: i1 - i0])
            torch.argmax(q.mul_(r[None, :]), dim=1, out=labels[i0:i1])

    s = torch.stack(mat.workers.map(times_c)).sum(0)
    mat._check_clusters(s)  # c > 0: an all-zero cluster is a zero entry here
    err, counter = 1e6, 0  # the official start: a tol >= 1e6 runs no iteration
    while err > tol:
        torch.div(inv_k, s, out=r)
        s = torch.stack(mat.workers.map(fused)).sum(0)
        if counter % check_every == 0:
            err = float(torch.nansum(torch.abs(c / c_new - 1)))
        c, c_new = c_new, c
        counter += 1
    if not bool(torch.isfinite(r).all()) or not bool(torch.isfinite(c).all()):
        mat.diagnose()
        raise NcdError("Sinkhorn-Knopp produced non-finite duals (over/underflow of P^λ); expected a smaller lamb")
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    mat.workers.map(assign)
    if mat.row_scale is not None:
        r = r / mat.row_scale  # back from r̂ = r ⊙ M and ĉ = c ⊙ m to the official duals
        c = c / mat.col_scale
    return {"labels": labels, "r": r, "c": c, "iterations": counter, "error": err}


def _run(source: Callable[[int, int], Tensor], n: int, k: int, lamb: float, tol: float, check_every: int,
         storage: str, device: torch.device, chunk_size: int | None, return_info: bool, what: str):
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
    _check_params(lamb, tol, check_every, storage)
    dev = _resolve_device(device, p)
    n, k = p.shape

    def source(i0: int, i1: int, out: Tensor | None = None) -> Tensor:
        if out is None:
            return p[i0:i1].to(device=dev, dtype=torch.float64, copy=True)
        return out.copy_(p[i0:i1])

    with torch.no_grad():
        return _run(source, n, k, lamb, tol, check_every, storage, dev, chunk_size, return_info, "sela_sinkhorn")


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
    _check_params(lamb, tol, check_every, storage)
    dev = _resolve_device(device, f)
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
        return _run(source, n, k, lamb, tol, check_every, storage, dev, chunk_size, return_info, "sela_label_step")


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
