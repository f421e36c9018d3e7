"""Time SeLa's label step at N = 200,000, K = 3,000, float64: ncd.losses.sela_sinkhorn beside a plain NumPy
transcription of the official routine's algebra (``sinkhornknopp.optimize_L_sk``), in one run.

    .venv/bin/python benchmarks/sela_sinkhorn.py                 # the issue's size (needs ~10 GB of RAM)
    .venv/bin/python benchmarks/sela_sinkhorn.py --n 20000       # a quick look

Prints the seconds of each, the ratio, the iteration counts and whether the labels are identical; with
CUDA available also the time on the GPU (and whether its labels are identical too).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np
import torch


def official_numpy(ps: np.ndarray, lamb: float, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The official algebra on a caller-owned copy (it works in place, as upstream)."""
    n, k = ps.shape
    ps = ps.T  # K x N view
    r = np.ones((k, 1), dtype=np.float64) / k
    c = np.ones((n, 1), dtype=np.float64) / n
    ps **= lamb
    inv_k, inv_n = np.float64(1.0 / k), np.float64(1.0 / n)
    err, counter = 1e6, 0
    while err > tol:
        r = inv_k / (ps @ c)
        c_new = inv_n / (r.T @ ps).T
        if counter % 10 == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        counter += 1
    ps *= np.squeeze(c)
    ps = ps.T
    ps *= np.squeeze(r)
    ps = ps.T
    return np.nanargmax(ps, 0), r.ravel(), c.ravel(), counter


def make_probs(n: int, k: int, seed: int, scale: float) -> np.ndarray:
    """Softmax of Gaussian logits, built in blocks to keep the temporaries small."""
    rng = np.random.default_rng(seed)
    p = np.empty((n, k), dtype=np.float64)
    for i in range(0, n, 10_000):
        x = rng.standard_normal((min(10_000, n - i), k)) * scale
        x -= x.max(1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(1, keepdims=True)
        p[i:i + len(x)] = x
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=3_000)
    ap.add_argument("--lamb", type=float, default=25.0)
    ap.add_argument("--tol", type=float, default=0.1)
    ap.add_argument("--scale", type=float, default=2.0, help="std of the random logits")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--storage", default="float64", choices=["float64", "float32", "recompute"])
    ap.add_argument("--skip-numpy", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ncd.losses import sela_sinkhorn

    print(f"N={args.n} K={args.k} float64 lambda={args.lamb} tol={args.tol}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}",
          flush=True)
    p = make_probs(args.n, args.k, 0, args.scale)
    print(f"P: {p.nbytes / 2**30:.2f} GiB", flush=True)

    t = time.perf_counter()
    labels, r, c, info = sela_sinkhorn(p, args.lamb, args.tol, storage=args.storage, return_info=True)
    t_ours = time.perf_counter() - t
    labels, r, c = labels.numpy(), r.numpy(), c.numpy()
    print(f"ncd.losses.sela_sinkhorn (CPU, {args.storage}): {t_ours:.1f} s, {info['iterations']} iterations "
          f"(build {info['build_s']:.1f} s, chunk {info['chunk_size']} rows)", flush=True)
    gc.collect()

    if not args.skip_numpy:
        work = p.copy()  # the official routine destroys its input; the copy is not timed
        t = time.perf_counter()
        ref_l, ref_r, ref_c, ref_it = official_numpy(work, args.lamb, args.tol)
        t_ref = time.perf_counter() - t
        del work
        gc.collect()
        print(f"NumPy transcription of optimize_L_sk: {t_ref:.1f} s, {ref_it} iterations", flush=True)
        same = bool(np.array_equal(labels, ref_l))
        print(f"ratio NumPy / ncd: {t_ref / t_ours:.2f}x; labels identical: {same} "
              f"({int((labels != ref_l).sum())} differ); iterations equal: {ref_it == info['iterations']}; "
              f"max rel. diff r {np.max(np.abs(r / ref_r - 1)):.2e}, c {np.max(np.abs(c / ref_c - 1)):.2e}", flush=True)

    if torch.cuda.is_available():
        dev = torch.device("cuda")
        sela_sinkhorn(p[:1000], args.lamb, args.tol, device=dev)  # warm-up (context, kernels)
        torch.cuda.synchronize()
        t = time.perf_counter()
        gl, _, _, ginfo = sela_sinkhorn(p, args.lamb, args.tol, device=dev, storage=args.storage, return_info=True)
        torch.cuda.synchronize()
        t_gpu = time.perf_counter() - t
        print(f"ncd.losses.sela_sinkhorn ({torch.cuda.get_device_name(0)}, {args.storage}, NumPy input copied "
              f"to the GPU chunk by chunk): {t_gpu:.1f} s, {ginfo['iterations']} iterations; labels identical to "
              f"the CPU: {bool(np.array_equal(gl.cpu().numpy(), labels))}", flush=True)


if __name__ == "__main__":
    main()
