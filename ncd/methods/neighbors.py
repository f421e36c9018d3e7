"""Nearest-neighbour mining on the pretext features (SCAN 1.6), with faiss."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from ncd.checkpoint import load_model, load_state_strict
from ncd.errors import NcdError
from ncd.data import build_dataset, get_info
from ncd.data.wrappers import Transformed
from ncd.methods.common import RunContext, collect, inference_device, make_loader
from ncd.models import model_from_arch
from ncd.utils import atomic_path

log = logging.getLogger("ncd")


def gpu_search_available(faiss) -> bool:
    """Whether this faiss build has GPU support and a GPU is visible (faiss-gpu on a GPU node; the
    faiss-cpu wheel has no ``StandardGpuResources``)."""
    return hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def knn_indices(features: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product search of every row against all rows: ``[N, k+1]`` indices,
    normally with the row itself in column 0 (faiss ``IndexFlatIP``, as SCAN)."""
    import faiss  # only mining needs faiss, and not every machine has it (the GPU test machine has none)

    x = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    if gpu_search_available(faiss):
        # exact search either way; on the GPU, ImageNet-200's 260k × 260k products take seconds
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    _, idx = index.search(x, min(k + 1, len(x)))
    return idx.astype(np.int64)


def neighbor_agreement(indices: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of the k neighbours (column 0 excluded) whose label equals the anchor's."""
    targets = np.asarray(targets)
    return float((targets[indices[:, 1:]] == targets[:, None]).mean())


def run_mine(ctx: RunContext, pretrain_ckpt: Path, out: Path) -> dict[str, float]:
    """Embed train and test splits with the pretext model (val transform), mine neighbours,
    and write ``out`` (npz with ``train`` [N, k+1] and ``test`` [M, k_val+1])."""
    sc = ctx.cfg.get("mine", {})
    dataset = ctx.cfg["dataset"]
    info = get_info(dataset, ctx.data_root)
    blob = load_model(pretrain_ckpt, expected={"kind": "contrastive"})
    model = model_from_arch(blob["arch"])
    load_state_strict(model, blob["state_dict"], f"pretext checkpoint {pretrain_ckpt}")
    device = inference_device(ctx.runtime)
    model.to(device).eval()
    t = ctx.transform("val", info)
    result: dict[str, np.ndarray] = {}
    stats: dict[str, float] = {}
    for name, split, k in (("train", info.train_split, int(sc.get("topk", 20))),
                           ("test", info.test_split, int(sc.get("topk_val", 5)))):
        ds = Transformed(build_dataset(dataset, ctx.data_root, split), t)
        loader = make_loader(ds, int(sc.get("batch_size", 256)), ctx, train=False)
        feats, targets = collect(model, loader, device, f"embed {split}")
        idx = knn_indices(feats.numpy(), k)
        result[name] = idx
        labelled = targets.numpy() >= 0
        if labelled.all():
            stats[f"{name}_agreement"] = neighbor_agreement(idx, targets.numpy())
            log.info("neighbour label agreement on %s (top-%d): %.2f%%", split, k, 100 * stats[f"{name}_agreement"])
    save_neighbors(out, result)
    return stats


NEIGHBOR_SPLITS = ("train", "test")


def save_neighbors(path: str | Path, neighbors: dict[str, np.ndarray]) -> None:
    """Write the mined neighbours (``train`` and ``test`` index arrays) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **neighbors)


def load_neighbors(path: str | Path, *, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Read and check a ``neighbors.npz`` written by the mine stage: ``{"train": [N, k+1], "test":
    [M, k_val+1]}`` int arrays of indices into their split. A truncated or foreign file, a missing
    array or an index out of range (``sizes``: the splits' image counts, when known) is an
    :class:`NcdError` naming the file."""
    path = Path(path)
    fix = "delete it and rerun the mine stage"
    if not path.is_file():
        raise NcdError(f"neighbours file {path} does not exist; run the mine stage first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise NcdError(f"neighbours file {path} is truncated or not an npz file ({reason}); {fix}") from e
    missing = [s for s in NEIGHBOR_SPLITS if s not in arrays]
    if missing:
        raise NcdError(f"neighbours file {path} has no {' or '.join(missing)} array (it has: "
                       f"{', '.join(sorted(arrays)) or 'none'}); {fix}")
    for name in NEIGHBOR_SPLITS:
        a = arrays[name]
        if a.ndim != 2 or a.shape[1] < 1 or not np.issubdtype(a.dtype, np.integer):
            raise NcdError(f"neighbours file {path}: '{name}' is a {a.dtype} array of shape {a.shape}; "
                           f"expected integer indices [images, k+1]; {fix}")
        n = (sizes or {}).get(name)
        if n is not None and (len(a) != n or (a.size and (a.min() < 0 or a.max() >= n))):
            raise NcdError(f"neighbours file {path}: '{name}' has {len(a)} rows with indices in "
                           f"[{a.min() if a.size else 0}, {a.max() if a.size else 0}]; expected {n} rows with "
                           f"indices in [0, {n - 1}] (mined on other data?); {fix}")
    return arrays
