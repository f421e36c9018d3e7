"""``python -m ncd``: help texts and bad input → ``error: ...`` on stderr, exit status 2.

A few cases run as real subprocesses (started together when the module begins, so their imports
overlap with the in-process tests); the rest call :func:`ncd.cli.main` directly.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ncd.checkpoint import save_model
from ncd.cli import main
from ncd.config import load_config, resolve_experiment
from ncd.stages import STAGES as TABLE

ROOT = Path(__file__).resolve().parents[1]
# every stage of the stage table is a sub-command
TRAINING_STAGES = [*TABLE, "evaluate"]
STAGES = ["prepare", *TRAINING_STAGES, "aggregate", "report", "check-config"]


@pytest.fixture(scope="module")
def exp_json() -> str:
    exp = resolve_experiment(load_config([ROOT / "config.yaml"]), "scan_digits")
    assert exp["backbone"] == "small_cnn" and exp["dataset"] == "digits"
    return json.dumps(exp)


def _stage_args(tmp: Path, exp_json: str, out: str = "x/model.ckpt") -> list[str]:
    return ["--experiment", "scan_digits", "--seed", "0", "--config", exp_json,
            "--data-root", str(tmp / "digits"), "--out", str(tmp / out)]


# --- subprocesses, started once for the module -----------------------------------------------------

class _Runs:
    def __init__(self, tmp: Path, exp_json: str) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, tuple[int, str, str]] = {}

        bad_cfg = tmp / "bad.yaml"
        bad_cfg.write_text("experiments:\n  scan_digits:\n    scan: {epochs: 2}\nbogus_key: 1\n")
        self.bad_cfg = bad_cfg

        self.cifar_root = tmp / "data" / "cifar10"

        # a pretext checkpoint written for resnet18_cifar; the experiment wants small_cnn
        self.pre_ckpt = tmp / "pre" / "model.ckpt"
        save_model(self.pre_ckpt, {"backbone.conv1.weight": torch.zeros(64, 3, 3, 3)},
                   {"kind": "contrastive", "backbone": "resnet18_cifar", "in_channels": 3,
                    "backbone_kwargs": {}, "features_dim": 128, "head": "mlp"})
        self.scan_tmp = tmp / "scan"

        cmds = {
            "help": ["--help"],
            "check_config": ["check-config", "config.yaml", str(bad_cfg)],
            "prepare_unknown": ["prepare", "--dataset", "nosuch", "--root", str(tmp / "data" / "nosuch")],
            "prepare_nodownload": ["prepare", "--dataset", "cifar10", "--root", str(self.cifar_root),
                                   "--no-download"],
            "scan_mismatch": ["scan", *_stage_args(self.scan_tmp, exp_json),
                              "--pretrain", str(self.pre_ckpt),
                              "--neighbors", str(tmp / "pre" / "neighbors.npz")],
        }
        for name, args in cmds.items():
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "ncd", *args], cwd=ROOT, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )

    def get(self, name: str) -> tuple[int, str, str]:
        if name not in self.results:
            out, err = self.procs[name].communicate(timeout=120)
            self.results[name] = (self.procs[name].returncode, out, err)
        return self.results[name]

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory, exp_json):
    r = _Runs(tmp_path_factory.mktemp("cli"), exp_json)
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main`` replaces the root logger's handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


# --- in-process: help ------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_stage_help(stage, capsys):
    with pytest.raises(SystemExit) as ei:
        main([stage, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and stage in out
    if stage in TRAINING_STAGES:
        for opt in ("--experiment", "--seed", "--config", "--data-root", "--out"):
            assert opt in out


def test_no_stage_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main([])
    assert ei.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_unknown_stage(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["train"])
    assert ei.value.code == 2
    assert "train" in capsys.readouterr().err


# --- in-process: errors ----------------------------------------------------------------------------

def test_check_config_valid(capsys):
    assert main(["check-config", str(ROOT / "config.yaml")]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg == load_config([ROOT / "config.yaml"])   # the resolved config, defaults filled
    assert "entropy_weight" in cfg["experiments"]["scan_digits"]["scan"]


def test_check_config_missing_file(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "none.yaml")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "none.yaml" in line


def test_invalid_json_config(tmp_path, exp_json, capsys):
    args = _stage_args(tmp_path, exp_json)
    i = args.index("--config")
    args[i + 1] = '{"method": "kmeans", "dataset": '
    assert main(["cluster", *args]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--config" in line and "JSON" in line
    assert not (tmp_path / "x" / "model.ckpt").exists()


def test_json_config_not_an_object(tmp_path, exp_json, capsys):
    args = _stage_args(tmp_path, exp_json)
    args[args.index("--config") + 1] = "[1, 2, 3]"
    assert main(["cluster", *args]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "JSON object" in line and "list" in line


def test_config_file_with_unknown_key(tmp_path, exp_json, capsys):
    block = json.loads(exp_json)
    block["scan"]["entropy_wieght"] = 1.0
    f = tmp_path / "exp.json"
    f.write_text(json.dumps(block))
    args = _stage_args(tmp_path, exp_json)
    args[args.index("--config") + 1] = f"@{f}"
    assert main(["cluster", *args]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "'entropy_wieght'" in line and "entropy_weight" in line


def test_config_file_missing(tmp_path, exp_json, capsys):
    """``--config @file`` naming a file that is not there is bad input like any other."""
    missing = tmp_path / "nothere.json"
    args = _stage_args(tmp_path, exp_json)
    args[args.index("--config") + 1] = f"@{missing}"
    assert main(["cluster", *args]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(missing) in line


def test_evaluate_missing_checkpoint(tmp_path, exp_json, capsys):
    missing = tmp_path / "missing.ckpt"
    rc = main(["evaluate", *_stage_args(tmp_path, exp_json, out="x/metrics.json"),
               "--ckpt", str(missing), "--stage", "scan"])
    assert rc == 2
    line = _error_line(capsys.readouterr().err)
    assert str(missing) in line
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_prepare_unknown_dataset_in_process(tmp_path, capsys):
    assert main(["prepare", "--dataset", "svhn", "--root", str(tmp_path)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "'svhn'" in line and "cifar10" in line and "digits" in line
    assert not (tmp_path / "READY").exists()


# --- subprocesses ----------------------------------------------------------------------------------

def test_main_help_lists_stages(runs):
    rc, out, err = runs.get("help")
    assert rc == 0, err
    assert "usage:" in out
    for stage in STAGES:
        assert stage in out


def test_check_config_unknown_key(runs):
    rc, out, err = runs.get("check_config")
    assert rc == 2, err
    line = _error_line(err)
    assert "'bogus_key'" in line
    assert "experiments" in line and "seeds" in line  # the valid keys are listed
    assert out == ""


def test_prepare_unknown_dataset(runs):
    rc, _, err = runs.get("prepare_unknown")
    assert rc == 2, err
    line = _error_line(err)
    assert "'nosuch'" in line and "cifar10" in line
    assert not (runs.tmp / "data" / "nosuch" / "READY").exists()


def test_prepare_without_download(runs):
    rc, _, err = runs.get("prepare_nodownload")
    assert rc == 2, err
    line = _error_line(err)
    assert "cifar10" in line and str(runs.cifar_root) in line
    assert "download" in line
    assert not (runs.cifar_root / "READY").exists()


def test_scan_with_foreign_pretext_checkpoint(runs):
    rc, _, err = runs.get("scan_mismatch")
    assert rc == 2, err
    line = _error_line(err)
    assert "resnet18_cifar" in line and "small_cnn" in line
    assert str(runs.pre_ckpt) in line
    assert not (runs.scan_tmp / "x" / "model.ckpt").exists()
    leftovers = list((runs.scan_tmp / "x").glob("*")) if (runs.scan_tmp / "x").exists() else []
    assert leftovers == []
