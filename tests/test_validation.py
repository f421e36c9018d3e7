"""Bad input caught at validation, from the config alone, before any job starts: nested
``--config`` strings, config errors through Snakemake, per-backbone ``backbone_kwargs`` and counts
larger than the data."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ncd.config import (
    IMAGE_EXTENSIONS,
    DataFacts,
    backbone_table,
    check_stage_config,
    coerce_strings,
    dataset_sizes,
    load_config,
    stage_config,
    validate,
)
from ncd.errors import NcdError
from ncd.stages import stages_of

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"
PAPER = ROOT / "workflow" / "experiments" / "paper.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture
def cfg(raw) -> dict:
    return copy.deepcopy(raw)


def _error(config: dict) -> str:
    with pytest.raises(NcdError) as ei:
        validate(config)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def snakemake(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def dirs(tmp: Path) -> list[str]:
    return [f"results_dir={tmp}/results", f"data_dir={tmp}/data", f"reports_dir={tmp}/reports"]


# --- 1. nested --config values arrive as strings ---------------------------------------------------

def test_strings_where_the_schema_wants_other_types_are_read_as_yaml(cfg):
    # what Snakemake's YAML base loader makes of --config 'seeds=[0, 1]' 'runtime={threads: 2, gpu: false}' ...
    cfg["seeds"] = ["0", "1"]
    cfg["runtime"] = {"threads": "2", "gpu": "false", "precision": "32", "accelerator": "cpu"}
    exp = cfg["experiments"]
    exp["scan_digits"]["mine"] = {"topk": "30", "topk_val": "5"}
    exp["scan_digits"]["scan"]["optimizer"]["lr"] = "1e-3"     # YAML 1.1 reads this one as a string
    exp["scan_digits"]["scan"]["augment"]["crop_scale"] = ["0.5", "1.0"]
    exp["cld_digits"]["cld"]["views"] = "2"                   # an enum of null and integers
    exp["cld_digits"]["cld"]["drop_last"] = "null"
    exp["uno_digits"]["split"] = "null"
    exp["kmeans_digits"]["variant"] = "1"                      # a string field keeps a numeric string
    validate(cfg)
    assert cfg["seeds"] == [0, 1]
    assert cfg["runtime"]["threads"] == 2 and cfg["runtime"]["gpu"] is False
    assert cfg["runtime"]["precision"] == "32"                 # "32" is one of the enum's strings
    assert exp["scan_digits"]["mine"]["topk"] == 30
    assert exp["scan_digits"]["scan"]["optimizer"]["lr"] == pytest.approx(1e-3)
    assert exp["scan_digits"]["scan"]["augment"]["crop_scale"] == [0.5, 1.0]
    assert exp["cld_digits"]["cld"]["views"] == 2 and exp["cld_digits"]["cld"]["drop_last"] is None
    assert exp["uno_digits"]["split"] is None
    assert exp["kmeans_digits"]["variant"] == "1"


def test_a_whole_block_given_as_one_string_is_read_too():
    from ncd.config import schema

    config = {"runtime": "{threads: 3, deterministic: true}", "seeds": "[4]"}
    coerce_strings(config, schema())
    assert config == {"runtime": {"threads": 3, "deterministic": True}, "seeds": [4]}


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(seeds=["zero"]), "'zero' is not of type 'integer'"),
    (lambda c: c.update(seeds=["-1"]), "seeds.0"),
    (lambda c: c["runtime"].update(threads="two"), "'two' is not of type 'integer'"),
    (lambda c: c["experiments"]["cld_digits"]["cld"].update(views="4"), "'4' at experiments.cld_digits.cld.views"),
])
def test_strings_that_read_as_nothing_valid_are_still_refused(cfg, edit, fragment):
    edit(cfg)
    assert fragment in _error(cfg)


def test_snakemake_dry_run_takes_nested_config_values(tmp_path):
    r = snakemake("-n", "--cores", "2", "--config", *dirs(tmp_path), "seeds=[0]", "runtime={threads: 2}",
                  "run_experiments=[kmeans_digits]")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"{tmp_path}/results/kmeans_digits/seed0/cluster/model.ckpt" in out
    assert "seed1" not in out and "scan_digits" not in out  # one seed, one experiment
    assert "threads: 2" in out  # the jobs take runtime.threads


# --- 2. config errors through Snakemake: one line, status 2 ----------------------------------------

def test_config_error_through_snakemake_is_one_line_and_status_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiments": {"scan_digits": {"backbone_kwargs": {"width": "wide"}}}}))
    r = snakemake("-n", "--cores", "1", "--configfile", str(bad), "--config", *dirs(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: backbone_kwargs.width 'wide' of experiment 'scan_digits' is not valid for backbone "
                      "'small_cnn'; expected an integer >= 1: channels of the first two convolutions (the last two "
                      "have twice as many)"]
    assert "Traceback" not in r.stderr and "NcdError" not in r.stderr and "common.smk" not in r.stderr


# --- 3. backbones and their kwargs ---------------------------------------------------------------

@pytest.mark.parametrize("backbone, kwargs, fragment", [
    ("small_cnn", {"width": "wide"},
     "backbone_kwargs.width 'wide' of experiment 'scan_digits' is not valid for backbone 'small_cnn'; "
     "expected an integer >= 1"),
    ("small_cnn", {"width": 0}, "backbone_kwargs.width 0 of experiment 'scan_digits'"),
    ("small_cnn", {"pool": 1.5}, "backbone_kwargs.pool 1.5"),
    ("small_cnn", {"widht": 32}, "unknown backbone_kwargs key 'widht' in experiment 'scan_digits' for backbone "
                                 "'small_cnn'; expected one of: width, pool"),
    ("resnet18_lowres", {"width": 32}, "expected none (it takes no backbone_kwargs)"),
    ("resnet18_cifar", {"init": "xavier"}, "backbone_kwargs.init 'xavier' of experiment 'scan_digits' is not valid "
                                           "for backbone 'resnet18_cifar'; expected one of: kaiming, torch"),
    ("sela_alexnet", {"size": "huge"}, "expected one of: big, small"),
    ("sela_resnetv2_50", {"final_norm": "maybe"}, "backbone_kwargs.final_norm 'maybe'"),
    ("timm:resnet18", {"drop_rate": 0.1}, "unknown backbone_kwargs key 'drop_rate'"),
    ("resnet19", {}, "unknown backbone 'resnet19' in experiment 'scan_digits'; expected one of: small_cnn"),
    ("timm:", {}, "unknown backbone 'timm:'"),
])
def test_bad_backbone_or_kwargs_is_caught_at_validation(cfg, backbone, kwargs, fragment):
    cfg["experiments"]["scan_digits"].update(backbone=backbone, backbone_kwargs=kwargs)
    assert fragment in _error(cfg)


@pytest.mark.parametrize("backbone, kwargs, read", [
    ("small_cnn", {"width": 8, "pool": 1}, {"width": 8, "pool": 1}),
    ("small_cnn", {"width": "16"}, {"width": 16}),  # as `--config` hands it over
    ("resnet18_cifar", {"init": "torch"}, {"init": "torch"}),
    ("resnet18", {"pretrained": False}, {"pretrained": False}),
    ("timm:resnet18", {"pretrained": "false"}, {"pretrained": False}),
    ("sela_alexnet", {"size": "small"}, {"size": "small"}),
    ("sela_resnetv2_50", {"final_norm": "false", "init": "torch"}, {"final_norm": False, "init": "torch"}),
])
def test_good_backbone_kwargs_pass_with_their_types(cfg, backbone, kwargs, read):
    cfg["experiments"]["scan_digits"].update(backbone=backbone, backbone_kwargs=kwargs)
    validate(cfg)
    assert cfg["experiments"]["scan_digits"]["backbone_kwargs"] == read


def test_backbone_table_matches_the_registry():
    from ncd.models.backbones import BACKBONES, build_backbone

    assert set(backbone_table()) == set(BACKBONES)
    # the kwargs the table declares are the ones the registry reads
    model, dim = build_backbone("small_cnn", 1, width=4, pool=1)
    assert dim == 2 * 4 * 1 * 1


@pytest.mark.parametrize("edit, fragment", [
    (lambda e: e["cld_digits"]["cld"].update(pool_len=4),
     "cld.pool_len 4 of experiment 'cld_digits' applies to the resnet18_cifar backbone only, but the backbone is "
     "'small_cnn'; expected cld.pool_len 0"),
    (lambda e: e["cld_digits"].update(backbone="resnet18_cifar", backbone_kwargs={"init": "kaiming"}),
     "backbone_kwargs.init 'kaiming' of CLD experiment 'cld_digits' clashes with cld.backbone_init 'torch'"),
])
def test_cld_backbone_options_must_fit_the_backbone(cfg, edit, fragment):
    edit(cfg["experiments"])
    assert fragment in _error(cfg)


@pytest.mark.parametrize("edit, fragment", [
    (lambda e: e["cld_digits"]["cld"].update(instance="infomin", augmentation="infomin"),
     "experiment 'cld_digits': augment.backend 'batched' has no batched path for cld.instance 'infomin'"),
    (lambda e: e["cld_digits"]["cld"].update(augmentation="infomin"),
     "no batched path for cld.augmentation 'infomin'; expected 'npid' or 'mocov2', or augment.backend: pil"),
    (lambda e: e["cld_digits"]["cld"].update(augmentation="mocov2"),
     "no batched path for cld.augmentation 'mocov2' with blur_p None / erasing False"),
    (lambda e: e["sela_digits"]["sela"]["augment"].update(preset="cifar"),
     "no batched path for sela.augment.resize 256 (no resize first; the cifar preset resizes to 256); "
     "expected sela.augment.resize: 0"),
    (lambda e: e["uno_digits"].update(transform={"resize": 16}),
     "experiment 'uno_digits': augment.backend 'batched' has no batched path for transform.resize 16"),
    (lambda e: e["scan_digits"].update(augment={"backend": "batched"}, transform={"resize": 12}),
     "experiment 'scan_digits': augment.backend 'batched' has no batched path for transform.resize 12"),
])
def test_batched_augmentation_without_a_batched_path_is_caught_at_validation(cfg, edit, fragment):
    """The embedded default's batched experiments (UNO, SeLa, CLD), and SCAN switched to batched, given an
    augmentation only the PIL path makes: one error naming it, before any job runs."""
    edit(cfg["experiments"])
    assert fragment in _error(cfg)


def test_batched_augmentation_with_a_batched_path_passes(cfg):
    cfg["experiments"]["cld_digits"]["cld"].update(augmentation="mocov2", augment={"blur_p": 0.0})
    cfg["experiments"]["sela_digits"]["sela"]["augment"].update(preset="cifar", resize=0)
    validate(cfg)


@pytest.mark.parametrize("stages, fragment", [
    ({"selflabel": "batched"}, "experiment 'scan_digits': augment.backend 'batched' has no batched path for "
                               "transform.resize 12"),
    ({"discover": "batched"}, "experiment 'scan_digits': augment.stages names stage 'discover', which method "
                              "'scan' does not have; expected one of: pretrain, mine, pretext_kmeans, scan, selflabel"),
    ({"pretrain": "gpu"}, "augment.stages.pretrain"),
])
def test_per_stage_backends_are_checked_like_the_experiment_backend(cfg, stages, fragment):
    """``augment.stages`` switching one stage to batched meets the same refusals as ``augment.backend``; a
    stage the method does not have, or a backend that does not exist, is named."""
    cfg["experiments"]["scan_digits"].update(augment={"backend": "pil", "stages": stages}, transform={"resize": 12})
    if "resize" not in fragment:
        cfg["experiments"]["scan_digits"]["transform"] = {"resize": 0}
    msg = _error(cfg)
    assert fragment in msg
    if stages == {"pretrain": "gpu"}:
        assert "'gpu'" in msg and "pil" in msg and "batched" in msg


def test_a_per_stage_backend_reaches_only_that_stage_slice(cfg):
    """``augment.stages: {pretrain: batched}``: the pretrain slice carries backend batched, every other
    stage's carries the experiment's backend and no ``stages`` key, so a per-stage entry that repeats the
    experiment's backend changes no hash at all."""
    from ncd.config import StageConfig
    from ncd.data.batched import augment_backend

    cfg["experiments"]["scan_digits"]["augment"] = {"backend": "pil"}
    plain = copy.deepcopy(cfg)
    cfg["experiments"]["scan_digits"]["augment"] = {"backend": "pil", "stages": {"pretrain": "batched"}}
    validate(cfg)
    assert stage_config(cfg, "scan_digits", "pretrain")["augment"] == {"backend": "batched"}
    for st in ("mine", "scan", "selflabel"):
        sl = stage_config(cfg, "scan_digits", st)
        assert sl.get("augment", {"backend": "pil"}) == {"backend": "pil"}  # mine makes no views
        assert sl["upstream"] != stage_config(plain, "scan_digits", st)["upstream"]  # pretrain changed upstream
    same = copy.deepcopy(plain)
    same["experiments"]["scan_digits"]["augment"] = {"backend": "pil", "stages": {"selflabel": "pil"}}
    validate(same)
    validate(plain)
    for st in ("pretrain", "mine", "scan", "selflabel"):
        for ev in (False, True):
            assert stage_config(same, "scan_digits", st, ev) == stage_config(plain, "scan_digits", st, ev)
    # a stage run by hand with the unresolved block reads its own entry
    raw = {"augment": {"backend": "pil", "stages": {"pretrain": "batched"}}}
    assert augment_backend(StageConfig(raw, "pretrain", ["augment"])) == "batched"
    assert augment_backend(StageConfig(raw, "scan", ["augment"])) == "pil"
    assert augment_backend({"augment": {"backend": "batched"}}) == "batched"


# --- 4. counts larger than the data --------------------------------------------------------------

BATCH = "the stage's training data (it drops the last partial batch, so no batch would be left)"


@pytest.mark.parametrize("edit, fragment", [
    (lambda e: e["scan_digits"]["mine"].update(topk=5000),
     "mine.topk 5000 of experiment 'scan_digits' asks for more neighbours than each image has (itself not counted) "
     "among the 1257 images of digits/train; expected at most 1256"),
    (lambda e: e["scan_digits"]["mine"].update(topk_val=540), "mine.topk_val 540"),
    (lambda e: e["scan_digits"]["pretrain"].update(batch_size=1258),
     f"pretrain.batch_size 1258 of experiment 'scan_digits' is larger than the 1257 images of digits/train, {BATCH}"
     "; expected at most 1257"),
    (lambda e: e["scan_digits"]["scan"].update(batch_size=2000), "scan.batch_size 2000"),
    (lambda e: e["scan_digits"]["selflabel"].update(batch_size=2000), "selflabel.batch_size 2000"),
    (lambda e: e["scan_digits"]["scan"].update(num_clusters=1), "scan.num_clusters 1 of experiment 'scan_digits' "
                                                                "gives 1 cluster(s)"),
    (lambda e: e["scan_digits"]["scan"].update(num_clusters=1300),
     "scan.num_clusters 1300 of experiment 'scan_digits' asks for more clusters than the 1257 images"),
    (lambda e: e["scan_digits"]["scan"].update(num_neighbors=21),
     "scan.num_neighbors 21 of experiment 'scan_digits' is more than the 20 neighbours the mine stage keeps "
     "(mine.topk); expected at most 20"),
    (lambda e: e["scan_digits"]["pretext_kmeans"].update(num_clusters=1300), "pretext_kmeans.num_clusters 1300"),
    (lambda e: e["scan_digits"]["pretrain"].update(pretext="moco"), "pretrain.checkpoint is empty"),
    (lambda e: e["kmeans_digits"].update(cluster={"num_clusters": 1258}), "cluster.num_clusters 1258"),
    # UNO trains on class subsets: digits-5/5 has 630 known and 627 novel training images
    (lambda e: e["uno_digits"]["pretrain_supervised"].update(batch_size=631),
     f"pretrain_supervised.batch_size 631 of experiment 'uno_digits' is larger than the 630 images of the 5 known "
     f"classes in digits/train, {BATCH}; expected at most 630"),
    (lambda e: e["uno_digits"]["discover"].update(batch_size=1258), "discover.batch_size 1258"),
    (lambda e: e["uno_digits"]["discover"].update(batch_size=1262, batching="paired"),
     "discover.batch_size 1262 of experiment 'uno_digits' gives 631 known + 631 novel images per step"),
    (lambda e: e["uno_digits"]["discover"].update(batch_size=1, batching="paired"), "discover.batch_size 1"),
    # 1257 = 4 * 314 + 1: a last batch of one image that train-mode BatchNorm cannot take
    (lambda e: e["sela_digits"]["sela"].update(batch_size=4),
     "sela.batch_size 4 of experiment 'sela_digits' leaves a last batch of 1 of the 1257 images of digits/train"),
    (lambda e: e["sela_digits"]["sela"].update(eval_batch_size=4), "sela.eval_batch_size 4"),
    (lambda e: e["sela_digits"]["sela"].update(drop_last=True, batch_size=1258), "sela.batch_size 1258"),
    (lambda e: e["sela_digits"]["sela"].update(num_clusters=1258), "sela.num_clusters 1258"),
    (lambda e: e["cld_digits"]["cld"].update(drop_last=True, batch_size=1258), "cld.batch_size 1258"),
    (lambda e: e["cld_digits"].update(cld_probe={"epochs": 1, "batch_size": 1258}), "cld_probe.batch_size 1258"),
    (lambda e: e["cld_digits"].update(cld_probe={"epochs": 1, "batch_size": 3}, runtime={"devices": 2}),
     "cld_probe.batch_size 3 of experiment 'cld_digits' is the batch over all 2 devices"),
    (lambda e: e["twostage_digits"]["superand"].update(batch_size=1258), "superand.batch_size 1258"),
    (lambda e: e["twostage_digits"]["twostage"].update(batch_size=1258), "twostage.batch_size 1258"),
    (lambda e: e["twostage_digits"]["twostage"].update(num_classes=1258), "twostage.num_classes 1258"),
    (lambda e: e["twostage_digits"]["twostage"].update(split="train+test"),
     "twostage.split 'train+test' of experiment 'twostage_digits' is not a split of dataset 'digits'; expected one "
     "of: train, test"),
    (lambda e: e["twostage_digits"]["superand"].update(split="unlabeled"), "superand.split 'unlabeled'"),
])
def test_counts_larger_than_the_data_are_caught_at_validation(cfg, edit, fragment):
    edit(cfg["experiments"])
    assert fragment in _error(cfg)


@pytest.mark.parametrize("edit", [
    lambda e: e["scan_digits"]["mine"].update(topk=1256, topk_val=539),
    lambda e: e["scan_digits"]["scan"].update(batch_size=1257, num_clusters=1257),
    lambda e: e["uno_digits"]["pretrain_supervised"].update(batch_size=630),
    lambda e: e["uno_digits"]["discover"].update(batch_size=1260, batching="paired"),
    lambda e: e["sela_digits"]["sela"].update(batch_size=5),           # 1257 = 5 * 251 + 2
    lambda e: e["sela_digits"]["sela"].update(batch_size=4, drop_last=True, eval_batch_size=5),
    lambda e: e["cld_digits"]["cld"].update(batch_size=2000),           # keeps the last batch (npid)
    lambda e: e["cld_digits"]["cld"].update(num_clusters=2000),         # per-batch k-means: any number
    lambda e: e["scan_digits"]["pretrain"].update(batch_size=5000, pretext="moco", checkpoint="moco.pth"),
])
def test_counts_at_the_limit_pass(cfg, edit):
    edit(cfg["experiments"])
    validate(cfg)


def test_counts_of_a_stage_that_does_not_run_are_not_checked(cfg):
    # cld_probe is off (epochs 0): its batch cannot cost anything
    cfg["experiments"]["cld_digits"]["cld_probe"] = {"epochs": 0, "batch_size": 100000}
    validate(cfg)


def test_paper_sizes_are_checked_against_the_dataset_of_the_experiment():
    config = load_config([CONFIG, PAPER])
    stl = copy.deepcopy(config)
    stl["experiments"]["twostage_stl10"]["twostage"]["batch_size"] = 13001  # train+test has 13,000
    assert "twostage.batch_size 13001 of experiment 'twostage_stl10' is larger than the 13000 images of " \
           "stl10/train+test" in _error(stl)
    big = copy.deepcopy(config)
    # UNO ImageNet-A: 30 novel classes of at most 1,300 images each; paired batches take half of the batch
    big["experiments"]["uno_imagenet-A"]["discover"]["batch_size"] = 2 * 882 * 1300 + 2
    assert "more than the larger of the at most 1146600 images (882 classes x at most 1300) of the 882 known " \
           "classes in imagenet/train" in _error(big)


def test_the_shipped_configs_validate_and_every_stage_slice_passes():
    """config.yaml and paper.yaml pass, and so does the slice each of their jobs receives (which lacks the
    other stages' blocks, so the checks across blocks must not run there)."""
    for files in ([CONFIG], [CONFIG, PAPER]):
        config = load_config(files)
        for name, exp in config["experiments"].items():
            for st in stages_of(exp["method"], exp):
                for evaluate in (False, True):
                    check_stage_config(name, st.name, stage_config(config, name, st.name, evaluate), evaluate)


def test_dataset_table_matches_the_registry_and_the_data():
    from ncd.data import DATASETS
    from ncd.data.datasets import load_digits_split

    table = dataset_sizes()
    assert set(table) == set(DATASETS)
    for name, info in DATASETS.items():
        t = table[name]
        assert tuple(t["splits"]) == info.splits, name
        assert (t["train"], t["pretrain"], t["test"]) == (info.train_split, info.pretrain_split, info.test_split)
        if name != "imagefolder":
            assert t["classes"] == info.num_classes, name
    for split in ("train", "test"):
        ds = load_digits_split(split)
        counts = [int((ds.targets == c).sum()) for c in range(10)]
        assert table["digits"]["splits"][split] == {"images": len(ds), "per_class": counts}


# --- a user's image folder: counted when it is there ------------------------------------------------

def _folder(root: Path, classes: dict[str, int]) -> Path:
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.{'png' if i % 2 else 'JPG'}").write_bytes(b"")
        (root / c / "notes.txt").write_text("not an image")
    return root


def _imagefolder_cfg(root: Path, **exp) -> dict:
    return {"experiments": {"folder": {"method": "scan", "dataset": "imagefolder", "data_path": str(root),
                                       "backbone": "small_cnn", **exp}}}


def test_imagefolder_counts_the_files_of_the_folder(tmp_path):
    root = _folder(tmp_path / "imgs", {"cat": 4, "dog": 3})
    small = {"pretrain": {"batch_size": 7}, "scan": {"batch_size": 7, "num_neighbors": 6},
             "selflabel": {"batch_size": 7}, "mine": {"topk": 6, "topk_val": 6}}
    validate(_imagefolder_cfg(root, **copy.deepcopy(small)))
    cfg = _imagefolder_cfg(root, **{**copy.deepcopy(small), "mine": {"topk": 7, "topk_val": 6}})
    assert _error(cfg) == (f"mine.topk 7 of experiment 'folder' asks for more neighbours than each image has (itself "
                           f"not counted) among the 7 images in {root}; expected at most 6")
    cfg = _imagefolder_cfg(root, **{**copy.deepcopy(small), "scan": {"batch_size": 8, "num_neighbors": 6}})
    assert "scan.batch_size 8 of experiment 'folder' is larger than the 7 images in" in _error(cfg)
    # the default batch of 512 is refused as well, before a job starts; a missing folder is not (yet) counted
    assert "pretrain.batch_size 512" in _error(_imagefolder_cfg(root))
    validate(_imagefolder_cfg(tmp_path / "not-there-yet"))


def test_imagefolder_class_subsets_and_layout_match_the_loader(tmp_path):
    from ncd.data.datasets import imagefolder_classes
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS
    root = _folder(tmp_path / "imgs" / "train", {"a": 2, "b": 5, "c": 1})
    _folder(tmp_path / "imgs" / "test", {"a": 1, "d": 1})
    data = DataFacts({"dataset": "imagefolder", "data_path": str(tmp_path / "imgs")})
    assert data.class_names() == imagefolder_classes(tmp_path / "imgs") == ["a", "b", "c", "d"]
    assert data.images("train", cap=100)[0] == 8
    assert data.images("train", [1], cap=100)[0] == 5
    assert data.images("train", cap=3)[0] == 7  # counting stops once a check has enough: c is not counted
    uno = {"method": "uno", "dataset": "imagefolder", "data_path": str(tmp_path / "imgs"), "backbone": "small_cnn",
           "split": {"known": [1, 2], "novel": [0, 3]}, "pretrain_supervised": {"batch_size": 7}}
    assert "pretrain_supervised.batch_size 7 of experiment 'uno' is larger than the 6 images of the 2 known classes " \
           f"in {root}" in _error({"experiments": {"uno": uno}})


# --- fast: no torch for a config that needs none -----------------------------------------------------

def test_validation_does_not_import_torch(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    del raw["experiments"]["uno_digits"]  # a named UNO split is looked up in ncd.data.uno, which imports torch
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(raw))
    code = ("import sys; from ncd.config import load_config; load_config([sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'torchvision', 'lightning') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
