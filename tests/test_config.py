"""Configuration: schema validation with defaults, clear errors, class splits, resolution."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from ncd.config import (
    SCHEMA_PATH,
    schema,
    check_class_split,
    check_experiment,
    load_config,
    resolve_experiment,
    selected_experiments,
    validate,
)
from ncd.errors import NcdError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"
PAPER = ROOT / "workflow" / "experiments" / "paper.yaml"

PAPER_RUN = ["kmeans_cifar10", "scan_cifar10", "kmeans_cifar100-20", "scan_cifar100-20", "kmeans_stl10",
             "scan_stl10", "scan_imagenet-50", "scan_imagenet-100", "scan_imagenet-200",
             "uno_cifar10", "uno_cifar100-80-20", "uno_cifar100-50-50", "uno_imagenet-A", "uno_imagenet-B",
             "uno_imagenet-C", "sela_cifar10", "sela_imagenet_alexnet", "sela_imagenet_resnet50",
             "cld_cifar10_npid", "npid_cifar10_original", "npid_cifar10", "cld_cifar100_npid",
             "npid_cifar100_original", "npid_cifar100", "cld_cifar10_moco", "moco_cifar10", "cld_cifar100_moco",
             "moco_cifar100", "cld_imagenet_mocov2", "mocov2_imagenet_original", "mocov2_imagenet",
             "cld_imagenet_infomin", "infomin_imagenet", "twostage_cifar10", "twostage_cifar100-20",
             "twostage_cifar100", "twostage_stl10"]


@pytest.fixture(scope="module")
def raw() -> dict:
    """config.yaml as written (no defaults)."""
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture
def cfg(raw) -> dict:
    return copy.deepcopy(raw)


@pytest.fixture(scope="module")
def embedded() -> dict:
    return load_config([CONFIG])


def _error(config: dict) -> str:
    with pytest.raises(NcdError) as ei:
        validate(config)
    return str(ei.value)


# --- the shipped configurations ---------------------------------------------------------------

def test_schema_file_exists_and_is_draft7():
    top = yaml.safe_load(SCHEMA_PATH.read_text())
    assert "draft-07" in top["$schema"]
    assert top["additionalProperties"] is False
    assert SCHEMA_PATH.is_relative_to(ROOT / "ncd")  # package data: the installed package validates on its own


def test_embedded_config_validates(embedded, raw):
    assert set(embedded["experiments"]) == set(raw["experiments"]) >= {"kmeans_digits", "scan_digits"}
    assert embedded["run_experiments"] is None
    assert list(selected_experiments(embedded)) == list(raw["experiments"])
    assert embedded["seeds"] == raw["seeds"]
    assert embedded["runtime"]["accelerator"] == raw["runtime"]["accelerator"]
    assert embedded["experiments"]["scan_digits"]["dataset"] == "digits"
    # the result is JSON serialisable (it goes to the stages as --config)
    json.dumps(embedded)


def _schema_defaults(block: str) -> dict:
    props = schema()["definitions"]["experiment"]["properties"][block]["properties"]
    return {k: v["default"] for k, v in props.items() if "default" in v}


@pytest.mark.parametrize("block", ["pretrain", "mine", "scan", "selflabel", "cluster", "evaluate"])
def test_embedded_stage_blocks_given_or_default(embedded, raw, block):
    """Every stage key of every experiment is either what config.yaml gives or the schema default."""
    defaults = _schema_defaults(block)
    assert defaults
    for name, exp in embedded["experiments"].items():
        given = (raw["experiments"][name].get(block) or {})
        for key, default in defaults.items():
            want = given.get(key, default)
            assert exp[block][key] == want, (name, block, key)


def test_embedded_defaults_filled(embedded, raw):
    scan = embedded["experiments"]["scan_digits"]
    given = raw["experiments"]["scan_digits"]
    # values the file gives are kept
    assert scan["backbone"] == given["backbone"]
    assert scan["backbone_kwargs"] == given.get("backbone_kwargs", {})
    for block in ("pretrain", "scan", "selflabel"):
        for key, value in (given.get(block) or {}).items():
            assert scan[block][key] == value, (block, key)
    # defaults fill the rest (SCAN's CIFAR-10 settings)
    if "entropy_weight" not in (given.get("scan") or {}):
        assert scan["scan"]["entropy_weight"] == 5.0
    if "confidence_threshold" not in (given.get("selflabel") or {}):
        assert scan["selflabel"]["confidence_threshold"] == 0.99
    if "ema" not in (given.get("selflabel") or {}):
        assert scan["selflabel"]["ema"] == {"enabled": False, "alpha": 0.999, "mode": "official"}
    assert scan["split"] is None and scan["seeds"] is None and scan["download"] is None
    assert scan["transform"] == {"resize": 0}

    km = embedded["experiments"]["kmeans_digits"]  # gives no backbone and no stage blocks at all
    assert set(raw["experiments"]["kmeans_digits"]) <= {"method", "dataset"}
    assert km["backbone"] == "resnet18_cifar"
    assert km["pretrain"]["optimizer"] == {"name": "sgd", "lr": 0.4, "weight_decay": 0.0001,
                                           "momentum": 0.9, "nesterov": False}
    assert km["pretrain"]["scheduler"] == {"name": "cosine", "eta_min_factor": 0.001}
    assert km["pretrain"]["pretext"] == "simclr" and km["pretrain"]["temperature"] == 0.1
    assert km["pretrain"]["epochs"] == 500 and km["pretrain"]["batch_size"] == 512
    assert km["scan"]["entropy_weight"] == 5.0 and km["scan"]["batch_size"] == 128
    assert km["scan"]["optimizer"] == {"name": "adam", "lr": 0.0001, "weight_decay": 0.0001}
    assert km["selflabel"]["confidence_threshold"] == 0.99 and km["selflabel"]["class_balance"] is True
    assert km["selflabel"]["ema"] == {"enabled": False, "alpha": 0.999, "mode": "official"}
    assert km["cluster"] == {"n_init": 10, "max_iter": 300, "num_clusters": 0}
    assert km["evaluate"]["splits"] == ["test"]


def test_defaults_are_not_shared_between_experiments(embedded):
    a = embedded["experiments"]["kmeans_digits"]["selflabel"]["ema"]
    b = embedded["experiments"]["scan_digits"]["selflabel"]["ema"]
    assert a == b and a is not b


def test_paper_config_validates():
    cfg = load_config([CONFIG, PAPER])
    assert cfg["run_experiments"] == PAPER_RUN
    sel = selected_experiments(cfg)
    assert list(sel) == PAPER_RUN
    assert "scan_digits" in cfg["experiments"] and "scan_digits" not in sel  # merged, not selected
    assert cfg["seeds"] == [0, 1, 2, 3, 4]
    assert cfg["runtime"]["accelerator"] == "gpu" and cfg["runtime"]["gpu"] is True
    c10 = sel["scan_cifar10"]
    assert (c10["dataset"], c10["backbone"]) == ("cifar10", "resnet18_cifar")
    # the schema defaults are SCAN's CIFAR-10 settings
    assert c10["pretrain"]["optimizer"]["lr"] == 0.4 and c10["pretrain"]["epochs"] == 500
    assert c10["scan"]["entropy_weight"] == 5.0 and c10["scan"]["batch_size"] == 128
    assert c10["selflabel"]["confidence_threshold"] == 0.99 and c10["selflabel"]["batch_size"] == 1000
    stl = sel["scan_stl10"]
    assert stl["backbone"] == "resnet18_stl" and stl["selflabel"]["epochs"] == 100
    # the YAML anchor carries the ImageNet settings to the other subsets
    for name, ds in [("scan_imagenet-50", "imagenet-50"), ("scan_imagenet-100", "imagenet-100"),
                     ("scan_imagenet-200", "imagenet-200")]:
        exp = sel[name]
        assert exp["dataset"] == ds
        assert exp["pretrain"]["pretext"] == "moco"
        assert exp["backbone"] == "resnet50"
        assert exp["seeds"] == [0, 1, 2]
        assert exp["scan"]["update_cluster_head_only"] is True
        assert exp["selflabel"]["ema"]["enabled"] is True
    assert sel["scan_imagenet-100"]["scan"]["batch_size"] == 1024


def test_load_config_missing_file(tmp_path):
    with pytest.raises(NcdError, match="does not exist"):
        load_config([CONFIG, tmp_path / "nope.yaml"])


def test_load_config_later_files_override(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("seeds: [7]\nexperiments:\n  scan_digits:\n    scan: {epochs: 2}\n")
    cfg = load_config([CONFIG, extra])
    assert cfg["seeds"] == [7]
    scan = cfg["experiments"]["scan_digits"]["scan"]
    assert scan["epochs"] == 2
    given = yaml.safe_load(CONFIG.read_text())["experiments"]["scan_digits"]["scan"]
    for key, value in given.items():   # deep merge keeps the rest
        if key != "epochs":
            assert scan[key] == value
    assert cfg["experiments"]["scan_digits"]["dataset"] == "digits"


# --- unknown keys and values -------------------------------------------------------------------

def test_unknown_top_level_key(cfg):
    msg = _error({**cfg, "sedes": [0]})
    assert "'sedes'" in msg
    for valid in ("seeds", "experiments", "runtime", "data_dir", "run_experiments"):
        assert valid in msg


def test_unknown_experiment_key(cfg):
    cfg["experiments"]["scan_digits"]["backbon"] = "small_cnn"
    msg = _error(cfg)
    assert "'backbon'" in msg and "scan_digits" in msg
    for valid in ("backbone", "method", "dataset", "pretrain", "scan", "selflabel", "split"):
        assert valid in msg


def test_unknown_stage_key(cfg):
    cfg["experiments"]["scan_digits"]["scan"]["entropy_wieght"] = 2.0
    msg = _error(cfg)
    assert "'entropy_wieght'" in msg and "scan_digits.scan" in msg
    for valid in ("entropy_weight", "num_heads", "optimizer", "batch_size"):
        assert valid in msg


def test_unknown_nested_keys(cfg):
    c = copy.deepcopy(cfg)
    c["experiments"]["scan_digits"]["selflabel"]["optimizer"]["betas"] = [0.9, 0.99]
    msg = _error(c)
    assert "'betas'" in msg and "lr" in msg and "momentum" in msg
    c = copy.deepcopy(cfg)
    c["runtime"]["gpus"] = 1
    msg = _error(c)
    assert "'gpus'" in msg and "accelerator" in msg and "devices" in msg


def test_unknown_dataset(cfg):
    cfg["experiments"]["scan_digits"]["dataset"] = "mnist"
    msg = _error(cfg)
    assert "'mnist'" in msg
    for allowed in ("digits", "cifar10", "cifar100-20", "stl10", "imagenet-50"):
        assert allowed in msg


def test_unknown_method(cfg):
    cfg["experiments"]["kmeans_digits"]["method"] = "dec"
    msg = _error(cfg)
    assert "'dec'" in msg and "kmeans" in msg and "scan" in msg


def test_other_bad_values(cfg):
    c = copy.deepcopy(cfg)
    c["experiments"]["scan_digits"]["scan"]["optimizer"]["name"] = "rmsprop"
    msg = _error(c)
    assert "rmsprop" in msg and "sgd" in msg and "adam" in msg
    c = copy.deepcopy(cfg)
    c["experiments"]["scan_digits"]["scan"]["epochs"] = 0
    assert "scan.epochs" in _error(c)
    c = copy.deepcopy(cfg)
    del c["experiments"]["scan_digits"]["dataset"]
    assert "dataset" in _error(c)
    c = copy.deepcopy(cfg)
    c["seeds"] = []
    with pytest.raises(NcdError):
        validate(c)


def test_missing_experiments():
    with pytest.raises(NcdError, match="experiments"):
        validate({"seeds": [0]})


# --- class splits ------------------------------------------------------------------------------

@pytest.mark.parametrize("known,novel,detail", [
    ([0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9], "[4]"),        # overlap
    ([0, 1, 2, 3, 4], [5, 6, 7, 8], "[9]"),              # class 9 in neither
    ([0, 1, 2, 3, 4], [5, 6, 7, 8, 10], "[10]"),         # out of range
    ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 9], None),         # a duplicate
    ([-1, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9], "[-1]"),      # negative id
])
def test_bad_class_split(cfg, known, novel, detail):
    cfg["experiments"]["scan_digits"]["split"] = {"known": known, "novel": novel}
    msg = _error(cfg)
    assert "scan_digits" in msg and "digits" in msg
    if detail:
        assert detail in msg


def test_valid_class_split(cfg):
    cfg["experiments"]["scan_digits"]["split"] = {"known": [0, 1, 2, 3, 4], "novel": [5, 6, 7, 8, 9]}
    out = validate(cfg)
    assert out["experiments"]["scan_digits"]["split"] == {"known": [0, 1, 2, 3, 4], "novel": [5, 6, 7, 8, 9]}
    # order does not matter
    check_class_split("x", {"dataset": "digits", "split": {"known": [9, 7, 5, 3, 1], "novel": [8, 6, 4, 2, 0]}})


def test_check_class_split_direct():
    check_class_split("x", {"dataset": "digits", "split": None})   # no split: nothing to check
    check_class_split("x", {"dataset": "digits"})
    with pytest.raises(NcdError, match="'cifar_exp'"):
        check_class_split("cifar_exp", {"dataset": "cifar10", "split": {"known": list(range(5)),
                                                                      "novel": list(range(5, 11))}})
    check_class_split("c100", {"dataset": "cifar100", "split": {"known": list(range(80)),
                                                                "novel": list(range(80, 100))}})


def test_imagefolder_split_is_not_rejected_before_the_data_exists():
    """imagefolder's classes come from the user's folders, unknown at validation time (the Snakefile
    validates before ``prepare`` runs): a split cannot be refuted against "0 classes"."""
    exp = {"method": "scan", "dataset": "imagefolder", "data_path": "/nonexistent/images",
           "split": {"known": [0, 1, 2], "novel": [3, 4]}}
    check_experiment("folder_ncd", exp)


def test_run_experiments_unknown(cfg):
    cfg["run_experiments"] = ["scan_digits", "scan_mnist"]
    msg = _error(cfg)
    assert "scan_mnist" in msg and "kmeans_digits" in msg
    cfg["run_experiments"] = ["scan_digits"]
    assert list(selected_experiments(validate(cfg))) == ["scan_digits"]


# --- resolution --------------------------------------------------------------------------------

def _schema_runtime_default() -> dict:
    return schema()["properties"]["runtime"]["default"]


def test_partial_runtime_keeps_the_other_defaults(embedded):
    """paper.yaml sets part of runtime; the cluster requests (mem_mb, time_min) still get defaults."""
    cfg = copy.deepcopy(embedded)
    cfg["runtime"] = {"gpu": True, "threads": 8}
    cfg["experiments"]["scan_digits"]["runtime"] = {"devices": 2, "mem_mb": 9000}
    rt = resolve_experiment(cfg, "scan_digits")["runtime"]
    assert rt["gpu"] is True and rt["threads"] == 8 and rt["devices"] == 2 and rt["mem_mb"] == 9000
    assert rt["time_min"] == _schema_runtime_default()["time_min"]
    assert rt["precision"] == "32-true"


def test_resolve_experiment_folds_in_globals(embedded):
    exp = resolve_experiment(embedded, "scan_digits")
    assert exp["runtime"] == {**_schema_runtime_default(), **embedded["runtime"]}
    assert exp["download"] is embedded["download"]
    assert exp["seeds"] == embedded["seeds"]
    assert exp["method"] == "scan" and exp["dataset"] == "digits"
    # a copy: changing it does not touch the config
    epochs, threads = embedded["experiments"]["scan_digits"]["scan"]["epochs"], embedded["runtime"]["threads"]
    exp["scan"]["epochs"] = epochs + 1
    exp["runtime"]["threads"] = threads + 98
    assert embedded["experiments"]["scan_digits"]["scan"]["epochs"] == epochs
    assert embedded["runtime"]["threads"] == threads


def test_resolve_experiment_overrides_win(cfg):
    cfg["download"] = True
    cfg["seeds"] = [0, 1, 2]
    cfg["runtime"]["threads"] = 1
    exp_cfg = cfg["experiments"]["scan_digits"]
    exp_cfg["runtime"] = {"threads": 4, "accelerator": "gpu"}
    exp_cfg["download"] = False
    exp_cfg["seeds"] = [5]
    validate(cfg)
    exp = resolve_experiment(cfg, "scan_digits")
    assert exp["runtime"]["threads"] == 4 and exp["runtime"]["accelerator"] == "gpu"
    # the rest of the global runtime still applies
    for key, value in cfg["runtime"].items():
        if key not in ("threads", "accelerator"):
            assert exp["runtime"][key] == value
    assert exp["download"] is False
    assert exp["seeds"] == [5]
    # the other experiment keeps the globals
    km = resolve_experiment(cfg, "kmeans_digits")
    assert km["runtime"]["threads"] == 1 and km["download"] is True and km["seeds"] == [0, 1, 2]


def test_resolve_experiment_global_download_false(cfg):
    cfg["download"] = False
    validate(cfg)
    assert resolve_experiment(cfg, "scan_digits")["download"] is False


def test_check_experiment_accepts_resolved_block(embedded):
    exp = resolve_experiment(embedded, "scan_digits")
    roundtrip = json.loads(json.dumps(exp))
    out = check_experiment("scan_digits", roundtrip)
    assert out == exp   # already complete: validation changes nothing
    paper = load_config([CONFIG, PAPER])
    for name in PAPER_RUN:
        check_experiment(name, resolve_experiment(paper, name))


def test_check_experiment_fills_defaults_and_rejects_bad_blocks():
    out = check_experiment("k", {"method": "kmeans", "dataset": "digits"})
    assert out["cluster"]["n_init"] == 10 and out["scan"]["entropy_weight"] == 5.0
    with pytest.raises(NcdError, match="'colour'"):
        check_experiment("k", {"method": "kmeans", "dataset": "digits", "colour": 1})
    with pytest.raises(NcdError, match="'svhn'"):
        check_experiment("k", {"method": "kmeans", "dataset": "svhn"})
    with pytest.raises(NcdError, match="'k'"):
        check_experiment("k", {"method": "kmeans", "dataset": "digits",
                               "split": {"known": [0, 1], "novel": [2]}})


@pytest.mark.parametrize("exp,msg", [
    ({"method": "uno", "dataset": "cifar10", "split_name": "cifar100-80/20"}, "is a split of dataset 'cifar100'"),
    ({"method": "uno", "dataset": "digits", "split_name": "digits-4/6"}, "unknown split_name 'digits-4/6'"),
    ({"method": "uno", "dataset": "digits"}, "has no class split"),
])
def test_uno_split_errors(exp, msg):
    with pytest.raises(NcdError, match=re.escape(msg)):
        validate({"experiments": {"u": exp}})


def test_uno_named_split_passes():
    cfg = validate({"experiments": {"u": {"method": "uno", "dataset": "digits", "split_name": "digits-5/5"}}})
    assert cfg["experiments"]["u"]["discover"]["num_heads"] == 4


@pytest.mark.timeout(300)
def test_the_installed_package_validates_a_config_on_its_own(tmp_path):
    """The schema is package data: a wheel of ncd, outside the repository, validates config.yaml."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(ROOT / "ncd", src / "ncd", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("ncd-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
        assert "ncd/schema/blocks/scan.yaml" in z.namelist()
    code = ("import sys, ncd.config as c; assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "cfg = c.load_config([sys.argv[2]]); print(sorted(cfg['experiments']))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), str(CONFIG)], cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "scan_digits" in r.stdout


def test_paper_settings_pin_the_official_loaders_and_modes():
    """AUDIT part A as the paper configuration resolves it: the per-experiment settings a later edit of
    paper.yaml or of a schema default could silently undo (the behaviours themselves are tested per method)."""
    from ncd.methods.cld import train_drop_last
    from ncd.methods.sela import label_batch_size
    from ncd.methods.uno import resolve_batching

    cfg = load_config([CONFIG, PAPER])
    exp = {name: resolve_experiment(cfg, name) for name in PAPER_RUN}
    for name, e in exp.items():
        if e["method"] == "uno":  # A9: every official UNO command runs --precision 16
            assert e["runtime"]["precision"] == "16-mixed", name
            # A1: ImageNet discovery pairs known and novel batches, CIFAR mixes them
            expected = "paired" if e["dataset"] == "imagenet" else "mixed"
            assert resolve_batching(e["dataset"], e["discover"]["batching"]) == expected, name
        if e["method"] == "cld":
            c = e["cld"]
            # A10: CIFAR and InfoMin keep the last batch, MoCo v2 (main_moco.py) drops it
            assert train_drop_last(c["instance"], c["drop_last"]) == (c["instance"] == "mocov2"), name
            if e["dataset"].startswith("cifar"):  # A7: PyTorch's default init for the CIFAR ResNet-18
                assert c["backbone_init"] == "torch", name
            if e["dataset"] == "imagenet":  # A6: per-GPU BatchNorm with shuffle-BN, no SyncBN
                assert e["runtime"]["devices"] == 8 and e["runtime"]["sync_batchnorm"] is False, name
                probe = e["cld_probe"]  # A12, A8: InfoMin's probe as PyContrast's, MoCo's as main_lincls
                infomin = c["instance"] == "infomin"
                assert (probe["init"], probe["validate"]) == (("default", False) if infomin else ("moco", True)), name
    # A4: the original baselines carry the reported variants, the lambda = 0 runs are labelled ablations
    assert exp["npid_cifar10_original"]["cld"]["views"] == 1 and exp["npid_cifar10_original"]["variant"] == "NPID"
    assert exp["mocov2_imagenet_original"]["cld"]["views"] == 2
    assert exp["mocov2_imagenet_original"]["variant"] == "MoCo v2 MLP 200ep"
    for name in ("npid_cifar10", "npid_cifar100", "moco_cifar10", "moco_cifar100", "mocov2_imagenet", "infomin_imagenet"):
        assert exp[name]["cld"]["lambda"] == 0 and "CLD pipeline, λ = 0" in exp[name]["variant"], name
    # A2, A11, A8: SeLa CIFAR's label pass at 128 over the shuffled images, the last batch kept, the monitor on
    sela = exp["sela_cifar10"]["sela"]
    assert label_batch_size(sela) == 128 and sela["label_pass_shuffle"] and not sela["drop_last"]
    assert sela["knn_monitor"]["enabled"] and not exp["sela_imagenet_alexnet"]["sela"]["knn_monitor"]["enabled"]
    # A3: the two-stage classifier's STL-10 stage 2 on the 13,000 labelled images
    assert exp["twostage_stl10"]["twostage"]["split"] == "train+test"
    assert exp["twostage_cifar10"]["twostage"]["split"] is None
