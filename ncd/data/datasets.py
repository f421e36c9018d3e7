"""Dataset classes and per-family loaders behind :mod:`ncd.data.registry`.

Every dataset yields ``(PIL image, int target)`` (target ``-1`` when unlabeled) and carries
``targets`` (int64 NumPy array) and ``classes``. Files are read through torchvision's own
loaders; integrity problems become :class:`NcdError` messages that name the file, the
expected md5 and the fix, instead of torchvision's generic "not found or corrupted".
"""

from __future__ import annotations

import abc

import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ncd.errors import NcdError
from ncd.utils import atomic_path

# torchvision is imported where a file dataset is opened, not with this module: importing it costs
# more than a second (torchvision.ops brings torch._dynamo), which every job that only reads an
# in-memory dataset (digits; every evaluate job of the embedded default) would pay for nothing.


def tv_module(module: str) -> Any:
    """``torchvision.<module>``, imported on first use (``datasets``, ``datasets.utils``, ...)."""
    import importlib

    return importlib.import_module(f"torchvision.{module}")

# --------------------------------------------------------------------------------------------
# Dataset classes


class ImageDataset(torch.utils.data.Dataset, abc.ABC):
    """Base class: ``targets`` (int64), ``classes``, optional ``transform``; ``_image(i)`` loads."""

    def __init__(self, targets: Sequence[int] | np.ndarray, classes: Sequence[str],
                 transform: Callable | None = None) -> None:
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    @abc.abstractmethod
    def _image(self, index: int) -> Image.Image:
        """Decode image ``index`` (each dataset kind knows its storage)."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self._image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])

    def raw_image(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` as a uint8 ``[C, H, W]`` tensor (what ``pil_to_tensor`` gives of it) and its
        target: the input of the batched augmentation path."""
        img, target = self[index]
        return tv_module("transforms.functional").pil_to_tensor(img), target


class ArrayDataset(ImageDataset):
    """Images held in a uint8 array: ``[N, H, W]`` (mode L), ``[N, H, W, 3]`` or, with
    ``channels_first``, ``[N, 3, H, W]`` (kept as loaded so 100k STL images are not copied)."""

    def __init__(self, data: np.ndarray, targets: Sequence[int] | np.ndarray,
                 classes: Sequence[str], transform: Callable | None = None,
                 channels_first: bool = False) -> None:
        super().__init__(targets, classes, transform)
        if len(data) != len(self.targets):
            raise NcdError(f"{len(data)} images but {len(self.targets)} targets")
        self.data = data
        self.channels_first = channels_first

    def _image(self, index: int) -> Image.Image:
        a = self.data[index]
        if self.channels_first:
            a = a.transpose(1, 2, 0)
        return Image.fromarray(np.ascontiguousarray(a))  # 2-D -> "L", HxWx3 -> "RGB"

    def raw_image(self, index: int) -> tuple[torch.Tensor, int]:
        """The array's own pixels, without the round trip through a PIL image (the same values; per
        image it cost several times what the batched augmentation of the image does)."""
        if self.transform is not None:
            return super().raw_image(index)
        a = self.data[index]
        a = a[None] if a.ndim == 2 else (a if self.channels_first else a.transpose(2, 0, 1))
        return torch.from_numpy(np.array(a, dtype=np.uint8, order="C")), int(self.targets[index])


class FileDataset(ImageDataset):
    """Images read from files (RGB); optionally resized so the short side is ``resize`` and
    then centre-cropped to a square when ``square`` is set."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Callable | None = None, resize: int | None = None,
                 square: bool = False) -> None:
        super().__init__([t for _, t in samples], classes, transform)
        self.paths = [p for p, _ in samples]
        self.resize = resize
        self.square = square

    def _image(self, index: int) -> Image.Image:
        img = read_rgb(self.paths[index])
        if self.resize:
            img = tv_module("transforms.functional").resize(img, self.resize)
            if self.square:
                img = tv_module("transforms.functional").center_crop(img, self.resize)
        return img


# PIL's failures on a bad file: truncated data, not an image, a decompression bomb, a broken header.
IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError,
                                                 Image.DecompressionBombError)


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully and convert it to RGB, whatever its mode (L, LA, P with or without
    transparency, RGBA, CMYK, 16-bit greyscale); a file PIL cannot decode is an :class:`NcdError`
    that names it (a truncated JPEG would otherwise fail in a training batch naming no file)."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA":
            # we convert, so the warning would only repeat once per image and epoch
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            img = Image.open(f)
            img.load()
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                # 16-bit or float greyscale: PIL's convert clips to 0..255; scale to the file's range
                a = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
                img = Image.fromarray(np.clip(np.rint(a * 255.0 / top), 0, 255).astype(np.uint8))
            elif img.mode in ("P", "PA") and "transparency" in img.info:
                img = img.convert("RGBA")
            return img.convert("RGB")
    except IMAGE_ERRORS as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image format PIL can read"
        raise NcdError(f"image {path} cannot be read ({reason}); delete or replace it") from e


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, no download)

DIGITS_TEST_SIZE = 0.3


DIGITS_CACHE = "digits.npz"  # under the dataset's root: the split arrays prepare writes for the later jobs


def _digits_arrays() -> dict[str, np.ndarray]:
    """scikit-learn's digits as uint8 images with the fixed stratified split's indices."""
    # lazily: sklearn.datasets is a slow import that only the digits dataset needs
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * 255.0 / 16.0).astype(np.uint8)
    idx_train, idx_test = train_test_split(
        np.arange(len(d.target)), test_size=DIGITS_TEST_SIZE, stratify=d.target, random_state=0)
    return {"images": images, "targets": d.target.astype(np.int64), "train": idx_train, "test": idx_test}


def write_digits_cache(path: str | os.PathLike) -> Path:
    """Write the digits split arrays to ``path`` (``.npz``, through a temporary file and a rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **_digits_arrays())
    return path


def _read_digits_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when ``path`` is missing or not a complete cache (then the caller
    recomputes from scikit-learn: the cache only saves the import, it is never the source of truth)."""
    try:
        with np.load(path) as z:
            a = {k: z[k] for k in ("images", "targets", "train", "test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, truncated, not an npz, a key absent
        return None
    n = len(a["targets"])
    if a["images"].shape != (n, 8, 8) or a["images"].dtype != np.uint8 or len(a["train"]) + len(a["test"]) != n:
        return None
    return a


def load_digits_split(split: str, transform: Callable | None = None, *,
                      cache: str | os.PathLike | None = None) -> ArrayDataset:
    """scikit-learn's 8×8 digits, 0..16 scaled to uint8, fixed stratified 70/30 split.

    ``cache``: an ``.npz`` :func:`write_digits_cache` wrote (``prepare`` does); read instead of
    importing scikit-learn's datasets when it is there and complete."""
    a = _read_digits_cache(Path(cache)) if cache is not None else None
    if a is None:
        a = _digits_arrays()
    idx = a["train"] if split == "train" else a["test"]
    return ArrayDataset(a["images"][idx], a["targets"][idx], [str(c) for c in range(10)], transform)


# --------------------------------------------------------------------------------------------
# CIFAR / STL-10: torchvision classes, md5-checked files

# METHODS.md 1.8: superclass name (SCAN's spelling fixed) -> fine CIFAR-100 indices.
CIFAR20_SUPERCLASSES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("aquatic mammals", (4, 30, 55, 72, 95)),
    ("fish", (1, 32, 67, 73, 91)),
    ("flowers", (54, 62, 70, 82, 92)),
    ("food containers", (9, 10, 16, 28, 61)),
    ("fruit and vegetables", (0, 51, 53, 57, 83)),
    ("household electrical devices", (22, 39, 40, 86, 87)),
    ("household furniture", (5, 20, 25, 84, 94)),
    ("insects", (6, 7, 14, 18, 24)),
    ("large carnivores", (3, 42, 43, 88, 97)),
    ("large man-made outdoor things", (12, 17, 37, 68, 76)),
    ("large natural outdoor scenes", (23, 33, 49, 60, 71)),
    ("large omnivores and herbivores", (15, 19, 21, 31, 38)),
    ("medium-sized mammals", (34, 63, 64, 66, 75)),
    ("non-insect invertebrates", (26, 45, 77, 79, 99)),
    ("people", (2, 11, 35, 46, 98)),
    ("reptiles", (27, 29, 44, 78, 93)),
    ("small mammals", (36, 50, 65, 74, 80)),
    ("trees", (47, 52, 56, 59, 96)),
    ("vehicles 1", (8, 13, 48, 58, 90)),
    ("vehicles 2", (41, 69, 81, 85, 89)),
)


def _cifar100_to_20() -> np.ndarray:
    table = np.full(100, -1, dtype=np.int64)
    for coarse, (_, fines) in enumerate(CIFAR20_SUPERCLASSES):
        table[list(fines)] = coarse
    assert (table >= 0).all()
    return table


CIFAR100_TO_20: np.ndarray = _cifar100_to_20()

_TV_CLASS_NAMES: dict[str, str] = {
    "cifar10": "CIFAR10", "cifar100": "CIFAR100", "cifar100-20": "CIFAR100", "stl10": "STL10",
}


def _tv_class(name: str) -> type:
    """torchvision's dataset class behind ``name`` (cifar10, cifar100, cifar100-20, stl10)."""
    return getattr(tv_module("datasets"), _TV_CLASS_NAMES[name])



def expected_files(name: str) -> list[tuple[str, str]]:
    """``(path relative to root, md5)`` of every checksummed file, read from the torchvision
    class at call time (so a test can patch the lists)."""
    cls = _tv_class(name)
    files = [(f"{cls.base_folder}/{f}", md5) for f, md5 in cls.train_list + cls.test_list]
    meta = getattr(cls, "meta", None)
    if isinstance(meta, dict):
        files.append((f"{cls.base_folder}/{meta['filename']}", meta["md5"]))
    return files


def check_files(name: str, root: str | os.PathLike) -> list[str]:
    """Return the missing files; raise :class:`NcdError` if a present file has a wrong md5."""
    root = Path(root)
    missing, bad = [], []
    for rel, md5 in expected_files(name):
        path = root / rel
        if not path.is_file():
            missing.append(rel)
        elif (actual := tv_module("datasets.utils").calculate_md5(path)) != md5:
            bad.append(f"{path} (md5 {actual}, expected {md5})")
    if bad:
        raise NcdError(
            f"dataset '{name}': checksum mismatch for " + "; ".join(bad)
            + ". The file is corrupt or not the official one: delete it and run again with "
              "download: true, or replace it with the official file")
    return missing


def _missing_error(name: str, root: Path, what: Sequence[str]) -> NcdError:
    shown = ", ".join(what[:4]) + (", ..." if len(what) > 4 else "")
    return NcdError(
        f"dataset '{name}' is not in {root} (missing: {shown}) and downloads are off "
        f"(download: false); set download: true or place the files there")


def download_torchvision(name: str, root: str | os.PathLike,
                         download: bool) -> list[tuple[str, str]]:
    """Make sure ``name``'s files are in ``root`` (downloading if allowed); return the verified
    ``(file, md5)`` list. Present files with a wrong md5 are an error, never re-downloaded."""
    root = Path(root)
    missing = check_files(name, root)
    if missing:
        if not download:
            raise _missing_error(name, root, missing)
        cls = _tv_class(name)
        archive = root / cls.filename
        if archive.is_file() and (actual := tv_module("datasets.utils").calculate_md5(archive)) != cls.tgz_md5:
            raise NcdError(
                f"dataset '{name}': checksum mismatch for {archive} (md5 {actual}, expected "
                f"{cls.tgz_md5}); delete it (an interrupted download?) and run again")
        root.mkdir(parents=True, exist_ok=True)
        try:
            tv_module("datasets.utils").download_and_extract_archive(cls.url, str(root), filename=cls.filename,
                                                  md5=cls.tgz_md5)
        except Exception as e:  # network errors, bad archive: all end the step the same way
            raise NcdError(
                f"could not download dataset '{name}' from {cls.url} into {root}: {e}. Check the "
                f"network, or fetch {cls.filename} yourself and extract it there") from e
        missing = check_files(name, root)
        if missing:
            raise NcdError(f"dataset '{name}': after downloading, still missing in {root}: "
                           + ", ".join(missing))
    return expected_files(name)


def _open_torchvision(name: str, root: Path, **kwargs: Any) -> Any:
    try:
        return _tv_class(name)(str(root), download=False, **kwargs)
    except RuntimeError as e:
        # Let our own check say which file is missing or corrupt; it raises if it finds out.
        missing = check_files(name, root)
        if missing:
            raise _missing_error(name, root, missing) from e
        raise NcdError(f"dataset '{name}' in {root}: {e}") from e


def load_cifar(name: str, root: str | os.PathLike, split: str,
               transform: Callable | None = None) -> ArrayDataset:
    """CIFAR-10, CIFAR-100 (fine) or CIFAR-100-20 (superclasses) from ``root``."""
    ds = _open_torchvision(name, Path(root), train=split == "train")
    targets = np.asarray(ds.targets, dtype=np.int64)
    classes = list(ds.classes)
    if name == "cifar100-20":
        targets = CIFAR100_TO_20[targets]
        classes = [n for n, _ in CIFAR20_SUPERCLASSES]
    return ArrayDataset(ds.data, targets, classes, transform)


def load_stl10(root: str | os.PathLike, split: str,
               transform: Callable | None = None) -> ArrayDataset:
    """STL-10; ``unlabeled`` images have target −1. ``train+test`` is the 13,000 labelled images (the
    5,000 train, then the 8,000 test), on which the two-stage classifier's stage 2 trains and is scored
    (Han et al., §4.1, following IIC's STL-10 protocol)."""
    if split == "train+test":
        parts = [_open_torchvision("stl10", Path(root), split=s) for s in ("train", "test")]
        classes = getattr(parts[0], "classes", None) or [str(c) for c in range(10)]
        return ArrayDataset(np.concatenate([p.data for p in parts]), np.concatenate([p.labels for p in parts]),
                            classes, transform, channels_first=True)
    ds = _open_torchvision("stl10", Path(root), split=split)
    classes = getattr(ds, "classes", None) or [str(c) for c in range(10)]
    return ArrayDataset(ds.data, ds.labels, classes, transform, channels_first=True)


# --------------------------------------------------------------------------------------------
# ImageNet and its subsets (user-provided archives or extracted folders)

IMAGENET_RESIZE = 256


def imagenet_subset_classes(n: int) -> list[tuple[str, str]]:
    """SCAN's ImageNet-``n`` class list (n in 50, 100, 200): ``(wnid, name)``, index = position."""
    if n not in (50, 100, 200):
        raise NcdError(f"no ImageNet subset with {n} classes; expected 50, 100 or 200")
    text = resources.files("ncd.data").joinpath(f"splits/imagenet_{n}.txt").read_text()
    out = []
    for line in text.splitlines():
        if line.strip():
            wnid, _, cname = line.strip().partition(" ")
            out.append((wnid, cname))
    return out


def imagenet_requirements(root: str | os.PathLike, splits: Sequence[str]) -> list[str]:
    """What is missing for ``splits``: the extracted folder or the archive that makes it."""
    root = Path(root)
    meta = tv_module("datasets.imagenet").ARCHIVE_META
    need = []
    if not (root / tv_module("datasets.imagenet").META_FILE).is_file() and not (root / meta["devkit"][0]).is_file():
        need.append(f"{meta['devkit'][0]} (or the meta.bin torchvision makes from it)")
    for split in splits:
        if not (root / split).is_dir() and not (root / meta[split][0]).is_file():
            need.append(f"{meta[split][0]} (or the extracted folder {split}/<wnid>/*.JPEG)")
    return need


def imagenet_missing_error(name: str, root: Path, need: Sequence[str]) -> NcdError:
    return NcdError(
        f"dataset '{name}' cannot be downloaded: put the ILSVRC2012 files from image-net.org "
        f"into {root}; missing: " + "; ".join(need))


def open_imagenet(root: str | os.PathLike, split: str, name: str = "imagenet") -> Any:
    """torchvision's ImageNet (extracts the archives on first use and checks their md5)."""
    root = Path(root)
    need = imagenet_requirements(root, [split])
    if need:
        raise imagenet_missing_error(name, root, need)
    try:
        return tv_module("datasets").ImageNet(str(root), split=split)
    except RuntimeError as e:
        for fname, md5 in tv_module("datasets.imagenet").ARCHIVE_META.values():
            if fname in str(e):
                raise NcdError(
                    f"dataset '{name}': checksum mismatch for {root / fname} (expected md5 "
                    f"{md5}); replace it with the official ILSVRC2012 file") from e
        raise NcdError(f"dataset '{name}' in {root}: {e}") from e


def load_imagenet(root: str | os.PathLike, split: str, transform: Callable | None = None,
                  subset: int | None = None, *, resize: int | None | str = "auto") -> FileDataset:
    """ImageNet, or SCAN's ImageNet-``subset``.

    ``resize="auto"``: SCAN's subsets are resized to short side 256 when read, as SCAN's own ImageNet
    loader does before its crops; the full ImageNet (UNO, SeLa, CLD and their probes) is read at full
    resolution, as their official loaders crop (RandomResizedCrop down to 8 % of the area) from the
    original JPEG. An int forces that short side, None full resolution."""
    if resize == "auto":
        resize = IMAGENET_RESIZE if subset is not None else None
    elif resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise NcdError(f"ImageNet resize must be 'auto', None or a positive short side, got {resize!r}")
    root = Path(root)
    if subset is None:
        ds = open_imagenet(root, split)
        return FileDataset(ds.samples, ds.wnids, transform, resize=resize)
    name = f"imagenet-{subset}"
    classes = imagenet_subset_classes(subset)
    if not ((root / tv_module("datasets.imagenet").META_FILE).is_file() and (root / split).is_dir()):
        open_imagenet(root, split, name)  # first use: parse the archives
    # Walk only the subset's class folders instead of all 1000.
    present = {w: i for i, (w, _) in enumerate(classes) if (root / split / w).is_dir()}
    samples = tv_module("datasets.folder").make_dataset(str(root / split), present, tv_module("datasets.folder").IMG_EXTENSIONS,
                                     allow_empty=True) if present else []
    if not samples:
        raise NcdError(f"dataset '{name}': no images of its classes in {root / split}")
    if len(present) < len(classes):
        warnings.warn(f"{name}: {len(classes) - len(present)} of {len(classes)} class folders "
                      f"are missing in {root / split}", stacklevel=2)
    return FileDataset(samples, [w for w, _ in classes], transform, resize=resize)


# --------------------------------------------------------------------------------------------
# imagefolder: the user's own images


def imagefolder_split_dir(root: str | os.PathLike, split: str) -> Path:
    """``root/train`` / ``root/test`` when ``root/train`` exists (test falls back to train),
    else ``root`` itself for both splits."""
    root = Path(root)
    if not root.is_dir():
        raise NcdError(f"dataset 'imagefolder': folder {root} does not exist; put your images "
                       f"there (class sub-folders for labels, or the images directly)")
    if (root / "train").is_dir():
        return root / split if (root / split).is_dir() else root / "train"
    return root


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def imagefolder_classes(root: str | os.PathLike) -> list[str]:
    """Sorted union of the class sub-folders of both splits (empty when unlabeled)."""
    dirs = {imagefolder_split_dir(root, s) for s in ("train", "test")}
    return sorted(set().union(*(_class_dirs(d) for d in dirs)))


def _loose_images(folder: Path) -> list[str]:
    return sorted(str(folder / f) for f in os.listdir(folder)
                  if tv_module("datasets.folder").is_image_file(f) and (folder / f).is_file())


def imagefolder_samples(root: str | os.PathLike, split: str) -> list[tuple[str, int]]:
    """``(path, target)`` of a split without decoding anything: the images of the class sub-folders
    (ImageFolder order, targets index :func:`imagefolder_classes`), or the loose images (−1)."""
    folder = imagefolder_split_dir(root, split)
    classes = imagefolder_classes(root)
    if _class_dirs(folder):
        class_to_idx = {c: i for i, c in enumerate(classes) if (folder / c).is_dir()}
        samples = tv_module("datasets.folder").make_dataset(str(folder), class_to_idx, tv_module("datasets.folder").IMG_EXTENSIONS,
                                         allow_empty=True)
    else:
        samples = [(f, -1) for f in _loose_images(folder)]
    if not samples:
        raise NcdError(f"dataset 'imagefolder': no images in {folder} (extensions: "
                       + ", ".join(tv_module("datasets.folder").IMG_EXTENSIONS) + ")")
    return samples


def load_imagefolder(root: str | os.PathLike, split: str, transform: Callable | None = None,
                     image_size: int = 224) -> FileDataset:
    """Class sub-folders give labels (ImageFolder order); loose images are unlabeled (−1)."""
    return FileDataset(imagefolder_samples(root, split), imagefolder_classes(root), transform,
                       resize=image_size, square=True)
