"""Checks of a user's image folder (``dataset: imagefolder``), run when it is prepared and when the
workflow is parsed, so a bad folder stops the run before any training: every image must decode,
class folders must hold images, and each experiment must have the images and classes it needs."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ncd.data import datasets as D
from ncd.errors import NcdError

# blocks whose `0` number of clusters means "the dataset's number of classes"
CLUSTER_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "kmeans": (("cluster", "num_clusters"),),
    "scan": (("scan", "num_clusters"), ("pretext_kmeans", "num_clusters")),
    "sela": (("sela", "num_clusters"),), "twostage": (("twostage", "num_classes"),),
}


def _decodes(path: str) -> str | None:
    """None when ``path`` decodes fully, else why not."""
    try:
        D.read_rgb(path)
    except NcdError as e:
        return str(e)
    return None


def check_imagefolder(root: str | os.PathLike, threads: int | None = None) -> list[str]:
    """Check a user's image folder and describe it (one line per split folder).

    Raises :class:`NcdError` for a missing or empty folder, an empty class folder, images lying
    beside class folders (they would be ignored), and any image that does not decode fully (each
    is decoded, ``threads`` at a time; the message names the files)."""
    root = Path(root)
    folders = {}
    for split in ("train", "test"):
        folders.setdefault(D.imagefolder_split_dir(root, split), []).append(split)
    lines = []
    for folder, splits in folders.items():
        classes = D._class_dirs(folder)
        loose = D._loose_images(folder)
        if classes and loose:
            raise NcdError(
                f"dataset 'imagefolder': {len(loose)} images lie directly in {folder} (e.g. {loose[0]}) beside "
                f"its class folders and would be ignored; move them into a class folder")
        samples = D.imagefolder_samples(root, splits[0])
        if classes:
            counts = {c: 0 for c in classes}
            for path, _ in samples:
                counts[Path(path).relative_to(folder).parts[0]] += 1
            empty = [c for c, n in counts.items() if n == 0]
            if empty:
                raise NcdError(f"dataset 'imagefolder': class folder {folder / empty[0]} has no images"
                               + (f" (nor {len(empty) - 1} other class folders)" if len(empty) > 1 else "")
                               + "; remove it or add images (a class folder is a label)")
        paths = [p for p, _ in samples]
        with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as pool:
            bad = [(p, why) for p, why in zip(paths, pool.map(_decodes, paths)) if why]
        if bad:
            more = f" ({len(bad)} of {len(paths)} images in {folder} are bad)" if len(bad) > 1 else ""
            raise NcdError(f"dataset 'imagefolder': {bad[0][1]}{more}")
        kind = f"{len(classes)} classes" if classes else "no class folders (unlabeled)"
        lines.append(f"{'/'.join(splits)}: {len(samples)} images, {kind} in {folder}")
    return lines


def check_experiment_needs(name: str, exp: dict[str, Any], root: str | os.PathLike) -> None:
    """What experiment ``name`` (a validated config block on ``dataset: imagefolder``) needs of the
    folder ``root``: class folders (labels) for UNO, at least 2 classes where a number of clusters
    defaults to the number of classes. Reads only file names; raises :class:`NcdError`."""
    root = Path(root)
    where = f"experiment '{name}' (dataset 'imagefolder' in {root})"
    classes = D.imagefolder_classes(root)
    method = exp["method"]
    if method == "uno" and len(classes) < 2:
        raise NcdError(f"{where} uses method 'uno', which needs labels: at least 2 class folders, found "
                       f"{len(classes)}{' (' + classes[0] + ')' if classes else ''}; put the images of each "
                       "class in its own sub-folder")
    if not classes:
        # The label-free methods train on loose images, but CLD's and Super-AND's kNN monitors and every
        # stage's evaluation read labels: stop before any job instead of after the training stages.
        raise NcdError(f"{where} has no class sub-folders: the workflow scores every method against labels, so "
                       "put the images of each class in its own sub-folder (loose images without labels "
                       "cannot be evaluated yet)")
    for block, key in CLUSTER_KEYS.get(method, ()):
        if not int((exp.get(block) or {}).get(key) or 0) and len(classes) < 2:
            raise NcdError(f"{where}: {block}.{key} is 0 (= the number of classes) but the folder has "
                           f"{len(classes)} class folders; set {block}.{key} to the number of clusters "
                           "(at least 2) or sort the images into class folders")
    # counts larger than the folder's images (batches, neighbours) are ncd.config.check_counts' part


def check_experiments(experiments: dict[str, dict[str, Any]]) -> None:
    """:func:`check_experiment_needs` for every imagefolder experiment whose folder exists (a missing
    folder fails when it is prepared, with its own message)."""
    for name, exp in experiments.items():
        if exp.get("dataset") == "imagefolder" and exp.get("data_path") and Path(exp["data_path"]).is_dir():
            check_experiment_needs(name, exp, exp["data_path"])
