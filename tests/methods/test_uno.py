"""UNO's model, schedule and both stages on fabricated CIFAR-10 files in the real format."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ncd.checkpoint import load_model
from ncd.config import load_config, resolve_experiment
from ncd.methods.evaluate import evaluate
from ncd.methods.common import RunContext, build_optimizer, build_scheduler
from ncd.methods.uno import run_discover, run_pretrain_supervised
from ncd.models import build_backbone, model_from_arch
from ncd.models.uno import MultiHeadModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))
import datafab  # noqa: E402


def test_multihead_model_shapes_and_cosine_logits():
    bb, d = build_backbone("small_cnn", 1, width=8, pool=1)
    m = MultiHeadModel(bb, d, num_labeled=5, num_unlabeled=4, num_heads=3, overcluster_factor=2, hidden_dim=32, proj_dim=8)
    with torch.no_grad():
        m.head_lab.prototypes.weight.mul_(7.0)
    m.normalize_prototypes()
    assert torch.allclose(m.head_lab.prototypes.weight.norm(dim=1), torch.ones(5))
    views = [torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8), torch.randn(6, 1, 4, 4)]
    out = m(views)
    assert out["logits_lab"].shape == (3, 6, 5)
    assert out["logits_unlab"].shape == (3, 3, 6, 4)
    assert out["logits_unlab_over"].shape == (3, 3, 6, 8)
    for k in ("logits_lab", "logits_unlab", "logits_unlab_over"):
        assert out[k].abs().max() <= 1 + 1e-5  # cosines


@pytest.mark.parametrize("epochs,warm,lr,min_lr", [(20, 5, 0.4, 0.001), (10, 1, 0.1, 0.01), (60, 5, 0.2, 0.001)])
def test_warmup_cosine_is_pl_bolts_schedule(epochs, warm, lr, min_lr):
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], {"name": "sgd", "lr": lr})
    sched = build_scheduler(opt, {"name": "warmup_cosine", "min_lr": min_lr, "warmup_epochs": warm}, epochs)
    for e in range(epochs):
        if e < warm:
            want = min_lr + e * (lr - min_lr) / max(1, warm - 1)
        else:
            want = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (e - warm) / (epochs - warm)))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()


def test_uno_cifar10_path_on_fabricated_files(tmp_path, monkeypatch):
    root = tmp_path / "data"
    datafab.patch_cifar10(monkeypatch, datafab.write_cifar10(root)["md5"])
    cfg = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]), "uno_cifar10")
    cfg["runtime"].update(accelerator="cpu", devices=1, num_workers=0)
    cfg["pretrain_supervised"].update(epochs=2, batch_size=2)
    cfg["discover"].update(epochs=2, batch_size=4, num_heads=2, hidden_dim=16, proj_dim=8)
    run = tmp_path / "run"

    def ctx(stage: str) -> RunContext:
        (run / stage).mkdir(parents=True, exist_ok=True)
        return RunContext("uno_cifar10", 0, stage, cfg, root, run / stage)

    run_pretrain_supervised(ctx("pretrain_supervised"), run / "pretrain_supervised/model.ckpt")
    pre = load_model(run / "pretrain_supervised/model.ckpt", expected={"kind": "uno", "backbone": "resnet18_lowres"})
    assert pre["arch"]["num_labeled"] == 5 and pre["meta"]["novel"] == [5, 6, 7, 8, 9]
    run_discover(ctx("discover"), run / "pretrain_supervised/model.ckpt", run / "discover/model.ckpt")
    blob = torch.load(run / "discover/model.ckpt", weights_only=True)
    assert blob["arch"]["overcluster_factor"] == 10 and blob["arch"]["num_heads"] == 2
    assert blob["meta"]["best_head"] in (0, 1)
    model = model_from_arch(blob["arch"])
    model.load_state_dict(blob["state_dict"])
    rows = evaluate(ctx("discover"), run / "discover/model.ckpt", run / "discover/metrics.json")
    got = {(r["split"], r["head"], r["metric"]) for r in rows}
    for split in ("train-novel", "test-novel"):
        assert {(split, h, m) for h in ("0", "1", "best", "avg") for m in ("acc", "acc_agnostic", "nmi", "ari")} <= got
    assert ("test-known", "best", "acc") in got and ("test-known", "best", "acc_agnostic") in got
    assert all(0 <= r["value"] <= 1 for r in rows if r["metric"].startswith("acc"))


def test_discover_starts_from_the_pretrained_encoder(tmp_path, monkeypatch):
    """With a zero learning rate the discovered model's encoder equals the pretrained one."""
    root = tmp_path / "data"
    datafab.patch_cifar10(monkeypatch, datafab.write_cifar10(root)["md5"])
    cfg = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]), "uno_cifar10")
    cfg["runtime"].update(accelerator="cpu", devices=1, num_workers=0)
    cfg["pretrain_supervised"].update(epochs=1, batch_size=2)
    cfg["discover"].update(epochs=1, batch_size=4, num_heads=1, hidden_dim=8, proj_dim=4, multicrop=False,
                           optimizer={"name": "sgd", "lr": 1e-12, "momentum": 0.0},
                           scheduler={"name": "constant"})
    run = tmp_path / "run"
    for s in ("pretrain_supervised", "discover"):
        (run / s).mkdir(parents=True)
    run_pretrain_supervised(RunContext("u", 0, "pretrain_supervised", cfg, root, run / "pretrain_supervised"),
                            run / "pretrain_supervised/model.ckpt")
    run_discover(RunContext("u", 0, "discover", cfg, root, run / "discover"), run / "pretrain_supervised/model.ckpt",
                 run / "discover/model.ckpt")
    pre = torch.load(run / "pretrain_supervised/model.ckpt", weights_only=True)["state_dict"]
    post = torch.load(run / "discover/model.ckpt", weights_only=True)["state_dict"]
    assert torch.allclose(pre["backbone.conv1.weight"], post["backbone.conv1.weight"])
    assert torch.allclose(pre["head_lab.prototypes.weight"], post["head_lab.prototypes.weight"], atol=1e-6)
