"""The paper configurations' code paths (RGB CIFAR-10 with the CIFAR ResNet-18, STL-10 with the STL
ResNet-18 and train+unlabeled pretext) on fabricated files in the datasets' real formats: every
stage of SCAN runs, checkpoints chain, and evaluation writes metrics rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ncd.config import load_config, resolve_experiment
from ncd.methods.evaluate import evaluate
from ncd.methods.common import RunContext
from ncd.methods.neighbors import run_mine
from ncd.methods.scan import run_scan
from ncd.methods.selflabel import run_selflabel
from ncd.methods.simclr import run_pretrain

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))
import datafab  # noqa: E402


@pytest.mark.parametrize("exp_name,write,patch,n_train", [
    ("scan_cifar10", datafab.write_cifar10, datafab.patch_cifar10, 10),
    ("scan_stl10", datafab.write_stl10, datafab.patch_stl10, 4),
])
def test_scan_paper_path_on_fabricated_files(tmp_path, monkeypatch, exp_name, write, patch, n_train):
    root = tmp_path / "data"
    patch(monkeypatch, write(root)["md5"])
    cfg = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]), exp_name)
    cfg["runtime"].update(accelerator="cpu", num_workers=0)
    cfg["pretrain"].update(epochs=1, batch_size=4)
    cfg["mine"].update(topk=2, topk_val=1)
    cfg["scan"].update(epochs=1, batch_size=2, num_neighbors=2, num_neighbors_val=1, num_heads=2)
    cfg["selflabel"].update(epochs=1, batch_size=2, confidence_threshold=0.0)
    run = tmp_path / "run"

    def ctx(stage: str) -> RunContext:
        (run / stage).mkdir(parents=True, exist_ok=True)
        return RunContext(exp_name, 0, stage, cfg, root, run / stage)

    run_pretrain(ctx("pretrain"), run / "pretrain/model.ckpt")
    stats = run_mine(ctx("pretrain"), run / "pretrain/model.ckpt", run / "pretrain/neighbors.npz")
    assert set(stats) == {"train_agreement", "test_agreement"}
    run_scan(ctx("scan"), run / "pretrain/model.ckpt", run / "pretrain/neighbors.npz", run / "scan/model.ckpt")
    run_selflabel(ctx("selflabel"), run / "scan/model.ckpt", run / "selflabel/model.ckpt")
    for stage in ("pretrain", "scan", "selflabel"):
        rows = evaluate(ctx(stage), run / stage / "model.ckpt", run / stage / "metrics.json")
        assert rows and all(r["dataset"] == cfg["dataset"] and r["value"] == r["value"] for r in rows)
        # ARI can be negative, and SCAN's top-5 can exceed 1 when clusters outnumber the labels present
        assert all(0 <= r["value"] <= 1 for r in rows if r["metric"] in ("acc", "nmi", "knn_top1"))
        blob = json.loads((run / stage / "metrics.json").read_text())
        assert blob["provenance"]["git_commit"] and blob["provenance"]["packages"]["torch"]
    scan = torch.load(run / "scan/model.ckpt", weights_only=True)
    assert scan["arch"]["backbone"] == cfg["backbone"] and scan["arch"]["num_heads"] == 2
    assert scan["arch"]["num_clusters"] == 10
    assert torch.load(run / "selflabel/model.ckpt", weights_only=True)["arch"]["num_heads"] == 1
