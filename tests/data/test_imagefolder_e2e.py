"""`dataset: imagefolder` with `data_path:` as the README documents it: a generated folder of PNG and
JPEG files in mixed modes and sizes, checked when prepared (bad files named) and run through the real
Snakefile for every method; the user's folder is only read."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ncd.cli import main
from ncd.config import load_config
from ncd.data import build_dataset
from ncd.data.datasets import FileDataset, read_rgb
from ncd.data.folder import check_experiment_needs, check_imagefolder
from ncd.errors import NcdError
from ncd.utils import folder_key

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLASSES = ("circle", "square", "stripes")
MODES = ("RGB", "L", "RGBA", "P")


def make_folder(root: Path, per_class: int = 8, classes: tuple[str, ...] = CLASSES, flat: bool = False) -> list[Path]:
    """``per_class`` images of each class: 32×32 or 40×28, modes RGB/L/RGBA/P, JPEG (RGB, L) or PNG."""
    rng = np.random.default_rng(0)
    files = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            w, h = (32, 32) if i % 3 else (40, 28)
            a = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            a[..., c % 3] += 200
            if c == 1:
                a[8:20, 8:20] = 255
            if c == 2:
                a[::4] = 0
            mode = MODES[(i + c) % len(MODES)]
            img = Image.fromarray(a)
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16) if mode == "P" else img.convert(mode)
            path = (root if flat else root / name) / f"{name}_{i}.{'jpg' if mode in ('RGB', 'L') and i % 2 == 0 else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            files.append(path)
    return files


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in the middle of its scan data: its header opens, decoding fails."""
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


# --- loading ---------------------------------------------------------------------------------------

def test_every_mode_and_size_loads_as_rgb_at_the_image_size(tmp_path):
    files = make_folder(tmp_path)
    assert {Image.open(f).mode for f in files} == set(MODES)
    assert {Image.open(f).format for f in files} == {"PNG", "JPEG"}
    assert {Image.open(f).size for f in files} == {(32, 32), (40, 28)}
    ds = build_dataset("imagefolder", tmp_path, "train", image_size=24)
    assert len(ds) == 24 and ds.classes == list(CLASSES)
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.mode == "RGB" and img.size == (24, 24)


def test_read_rgb_converts_modes_faithfully(tmp_path):
    Image.new("L", (4, 4), 100).save(tmp_path / "l.png")
    assert read_rgb(tmp_path / "l.png").getpixel((0, 0)) == (100, 100, 100)
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    assert read_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (10, 20, 30)
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert read_rgb(tmp_path / "p.png").getpixel((0, 0)) == (200, 100, 50)
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "deep.png")  # 16-bit greyscale
    assert read_rgb(tmp_path / "deep.png").getpixel((0, 0)) == (255, 255, 255)


def test_a_corrupt_image_is_named_when_read(tmp_path):
    (tmp_path / "cat").mkdir()
    bad = truncated_jpeg(tmp_path / "cat" / "bad.jpg")
    (tmp_path / "cat" / "text.png").write_text("not an image")
    with pytest.raises(NcdError, match=rf"image {bad} cannot be read"):
        FileDataset([(str(bad), 0)], ["cat"])[0]
    with pytest.raises(NcdError, match=r"text.png cannot be read \(not an image format"):
        read_rgb(tmp_path / "cat" / "text.png")


# --- preparation: the folder itself ----------------------------------------------------------------

def test_prepare_checks_every_image_and_names_the_bad_one(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    marker = tmp_path / "data" / "folders" / "imgs" / "READY"
    before = listing(tmp_path / "imgs")
    assert main(["prepare", "--dataset", "imagefolder", "--root", str(tmp_path / "imgs"), "--marker", str(marker)]) == 0
    assert "train/test: 24 images, 3 classes" in marker.read_text()
    assert listing(tmp_path / "imgs") == before  # nothing written into the user's folder
    marker.unlink()
    bad = truncated_jpeg(tmp_path / "imgs" / "square" / "broken.jpg")
    assert main(["prepare", "--dataset", "imagefolder", "--root", str(tmp_path / "imgs"), "--marker", str(marker)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and f"image {bad} cannot be read" in err[0]
    assert not marker.exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no images in"),
    ("empty_class", "class folder .*/dog has no images"),
    ("loose", "1 images lie directly in .* beside its class folders"),
    ("two_bad", r"image .*/a/x.png cannot be read .*\(2 of 6 images in .* are bad\)"),
])
def test_bad_folders(tmp_path, case, message):
    root = tmp_path / "imgs"
    if case != "missing":
        root.mkdir()
    if case in ("empty_class", "loose", "two_bad"):
        make_folder(root, per_class=2, classes=("a", "b"))
    if case == "empty_class":
        (root / "dog").mkdir()
    if case == "loose":
        Image.new("RGB", (8, 8)).save(root / "stray.png")
    if case == "two_bad":
        (root / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        truncated_jpeg(root / "b" / "y.jpg")
    with pytest.raises(NcdError, match=message):
        check_imagefolder(root)


# --- what an experiment needs of the folder (checked when the workflow is parsed) -----------------

def _exp(**over) -> dict:
    cfg = load_config([ROOT / "config.yaml"])
    return {**cfg["experiments"][over.pop("base")], "dataset": "imagefolder", **over}


def test_experiment_needs(tmp_path):
    make_folder(tmp_path / "three", per_class=4)
    make_folder(tmp_path / "one", per_class=4, classes=("only",))
    make_folder(tmp_path / "flat", per_class=4, flat=True)
    small = {"epochs": 1, "batch_size": 8}
    uno = _exp(base="uno_digits", split={"known": [0], "novel": [1, 2]}, pretrain_supervised=small,
               discover={**small, "num_heads": 1})
    check_experiment_needs("uno", uno, tmp_path / "three")
    with pytest.raises(NcdError, match=r"'uno', which needs labels: at least 2 class folders, found 1 \(only\)"):
        check_experiment_needs("uno", uno, tmp_path / "one")
    scan = _exp(base="scan_digits", pretrain=small, scan={**_exp(base="scan_digits")["scan"], "batch_size": 8},
                selflabel=small, mine={"topk": 5, "topk_val": 3})
    check_experiment_needs("scan", scan, tmp_path / "three")
    with pytest.raises(NcdError, match=r"scan.num_clusters is 0 \(= the number of classes\) but the folder has 1"):
        check_experiment_needs("scan", scan, tmp_path / "one")
    with pytest.raises(NcdError, match="has no class sub-folders"):
        check_experiment_needs("scan", scan, tmp_path / "flat")
    # batches and neighbours larger than the folder: tests/test_validation.py (ncd.config.check_counts)


# --- through the Snakefile ---------------------------------------------------------------------------

def snakemake(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def dirs(tmp: Path) -> list[str]:
    return ["--config", f"results_dir={tmp}/results", f"data_dir={tmp}/data", f"reports_dir={tmp}/reports"]


TINY_NET = {"backbone": "small_cnn", "backbone_kwargs": {"width": 8, "pool": 2}, "transform": {"resize": 16}}


def tiny_config(folder: Path) -> dict:
    """Every method on ``folder``: one epoch, batches of 8 (24 images), one seed."""
    common = {"dataset": "imagefolder", "data_path": str(folder), **TINY_NET}
    one = {"epochs": 1, "batch_size": 8}
    return {
        "seeds": [0],
        "run_experiments": ["scan_if", "uno_if", "sela_if", "cld_if", "twostage_if"],
        "runtime": {"accelerator": "cpu", "threads": 1},
        "experiments": {
            "scan_if": {"method": "scan", **common, "pretrain": {**one, "features_dim": 16},
                        "mine": {"topk": 3, "topk_val": 2}, "pretext_kmeans": {"n_init": 1},
                        "scan": {**one, "num_heads": 2, "num_neighbors": 3, "num_neighbors_val": 2},
                        "selflabel": {**one, "confidence_threshold": 0.5}},
            "uno_if": {"method": "uno", **common, "split": {"known": [0, 1], "novel": [2]},
                       "pretrain_supervised": one,
                       "discover": {**one, "num_heads": 2, "hidden_dim": 16, "proj_dim": 8, "multicrop": False}},
            "sela_if": {"method": "sela", **common,
                        "sela": {**one, "nopts": 1, "num_heads": 2, "num_clusters": 3, "linear_probe": one}},
            "cld_if": {"method": "cld", **common, "cld": {**one, "num_clusters": 2, "knn_every": 1, "pool_len": 0}},
            "twostage_if": {"method": "twostage", **common, "superand": {**one, "rounds": 1}, "twostage": one},
        },
    }


def test_a_folder_problem_stops_the_workflow_before_any_job(tmp_path):
    make_folder(tmp_path / "one", per_class=8, classes=("only",))
    cfg = tiny_config(tmp_path / "one")
    cfg["run_experiments"] = ["uno_if"]
    cfg["experiments"] = {"uno_if": cfg["experiments"]["uno_if"]}
    cfg["experiments"]["uno_if"]["split"] = {"known": [0], "novel": []}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = snakemake("-n", "--cores", "1", "--configfile", str(tmp_path / "c.yaml"), *dirs(tmp_path), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "needs labels: at least 2 class folders, found 1 (only)" in err[0]
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(900)
def test_imagefolder_end_to_end_for_every_method(tmp_path):
    """The README's custom-images recipe, through the real Snakefile, for every method; the folder is read only."""
    folder = tmp_path / "my_images"
    make_folder(folder)
    before = listing(folder)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(folder)))
    target = f"{tmp_path}/results/metrics.csv"
    r = snakemake(target, "--cores", "2", "--configfile", str(tmp_path / "tiny.yaml"), *dirs(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert listing(folder) == before  # no READY (nor anything else) written into the user's folder
    marker = tmp_path / "data" / "folders" / f"imagefolder-{folder_key(folder)}" / "READY"
    assert "train/test: 24 images, 3 classes" in marker.read_text()
    rows = list(csv.DictReader(open(target)))
    got = {(r["experiment"], r["stage"]) for r in rows}
    assert got == {("scan_if", s) for s in ("pretrain", "pretext_kmeans", "scan", "selflabel")} | {
        ("uno_if", "discover"), ("sela_if", "sela"), ("cld_if", "cld"), ("twostage_if", "superand"),
        ("twostage_if", "twostage")}
    assert {r["dataset"] for r in rows} == {"imagefolder"}
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["metric"] in ("acc", "nmi", "knn_top1"))
    assert {r["split"] for r in rows if r["experiment"] == "uno_if"} >= {"train-novel", "test-novel", "test-known"}
    r = snakemake(target, "-n", "--cores", "2", "--configfile", str(tmp_path / "tiny.yaml"), *dirs(tmp_path), timeout=300)
    assert "Nothing to be done" in r.stdout + r.stderr
