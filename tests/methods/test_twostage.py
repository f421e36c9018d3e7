"""The two-stage classifier's training stages (METHODS.md 6.3, 6.4): schedules, the Super-AND step
and its memory update, anchor rounds and what resumes, the fixed heads and the encoder-only
optimiser, lowest-loss epoch and head, evaluation rows; both stages on digits and the paper
code paths (CIFAR-10 with ResNet18withSobel, STL-10 train+unlabeled) on fabricated files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ncd.checkpoint import load_model
from ncd.config import load_config, resolve_experiment
from ncd.errors import NcdError
from ncd.methods.evaluate import evaluate
from ncd.methods.common import RunContext
from ncd.methods.superand import SuperANDModule, lr_factor, lr_schedule, run_superand
from ncd.methods.twostage import TwoStageModule, run_twostage
from ncd.models.sobel import ResNet18withSobel, SuperANDModel, TwoStageModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))
import datafab  # noqa: E402

TINY = {"backbone_kwargs": {"width": 4, "pool": 1}}


def _encoder(d: int = 8) -> ResNet18withSobel:
    return ResNet18withSobel(low_dim=d, in_channels=1, backbone="small_cnn", backbone_kwargs={"width": 4, "pool": 1})


def _cfg(name: str = "twostage_digits", files=("config.yaml",)) -> dict:
    return resolve_experiment(load_config([ROOT / f for f in files]), name)


# ---------------------------------------------------------------------------------- schedules
def test_lr_rule_first_decay_at_120_and_per_round():
    assert [lr_factor(e) for e in (0, 79, 80, 119)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_factor(120) == pytest.approx(0.1) and lr_factor(159) == pytest.approx(0.1)
    assert lr_factor(160) == pytest.approx(0.01) and lr_factor(199) == pytest.approx(0.01)
    assert lr_factor(280) == pytest.approx(1e-5)  # stage 2: x0.1 at 120, 160, 200, 240, 280
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    sched = lr_schedule(opt, {"start": 80, "every": 40, "gamma": 0.1}, period=200)
    lrs = []
    for _ in range(400):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[119] == pytest.approx(0.03) and lrs[120] == pytest.approx(0.003) and lrs[199] == pytest.approx(0.0003)
    assert lrs[200] == pytest.approx(0.03) and lrs[320] == pytest.approx(0.003)  # each round starts again


def _superand_module(n: int = 12, rounds: int = 5, epochs: int = 200, **extra) -> SuperANDModule:
    cfg = {"rounds": rounds, "epochs": epochs, "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9,
                                                             "nesterov": True, "weight_decay": 5e-4}, **extra}
    labels = torch.arange(n) % 3
    return SuperANDModule(SuperANDModel(_encoder(), n), cfg, labels, 3)


@pytest.mark.parametrize("epoch,weight", [(0, 0.0), (79, 0.0), (80, 0.2), (159, 0.2), (160, 0.4), (199, 0.4),
                                          (200, 0.0), (280, 0.2)])
def test_ue_weight_schedule_counts_inside_the_round(epoch, weight, monkeypatch):
    m = _superand_module()
    monkeypatch.setattr(SuperANDModule, "current_epoch", property(lambda self: epoch))
    monkeypatch.setattr(SuperANDModule, "discover", lambda self, r: None)
    m.on_train_epoch_start()
    assert m.ue_weight == pytest.approx(weight)
    assert m.round_epoch() == divmod(epoch, 200)


# --------------------------------------------------------------------------- Super-AND module
def test_training_step_updates_the_memory_with_view_two(monkeypatch):
    torch.manual_seed(0)
    m = _superand_module(n=10)
    monkeypatch.setattr(m, "log", lambda *a, **k: None)
    views = torch.randn(3, 2, 1, 8, 8)
    idx = torch.tensor([4, 0, 7])
    old = m.model.memory.clone()
    m.model.eval()  # the same features in the step and in the check below
    loss = m.training_step((views, torch.zeros(3), idx), 0)
    with torch.no_grad():
        f2 = m.model(views[:, 1])
    want = F.normalize(0.5 * old[idx] + 0.5 * f2, dim=1)
    torch.testing.assert_close(m.model.memory[idx], want)
    untouched = [i for i in range(10) if i not in idx.tolist()]
    torch.testing.assert_close(m.model.memory[untouched], old[untouched])
    loss.backward()  # the memory swap after the forward does not break the graph
    assert m.model.encoder.linear.weight.grad is not None


def test_discovery_per_round_and_resume_guard(monkeypatch):
    torch.manual_seed(1)
    m = _superand_module(n=12, rounds=5, epochs=3)
    m.model.memory = F.normalize(torch.randn(12, 8), dim=1)
    calls = []
    real = SuperANDModule.discover
    monkeypatch.setattr(SuperANDModule, "discover", lambda self, r: (calls.append(r), real(self, r)))
    for epoch in range(9):
        monkeypatch.setattr(SuperANDModule, "current_epoch", property(lambda self, e=epoch: e))
        m.on_train_epoch_start()
        a, nb = m.anchors()
        assert len(a) == int(12 * 0.25 * (epoch // 3)) and nb.shape == (len(a), 1)
    assert calls == [1, 2]  # once per round, none in round 0
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    state = ckpt["superand"]
    assert (state["round"], state["epoch"], state["anchor_round"]) == (2, 2, 2)
    assert ckpt["superand"]["consistency"] == m.consistency
    # a resumed module gets its table from the state dict and does not rediscover mid-round
    m2 = _superand_module(n=12, rounds=5, epochs=3)
    m2.load_state_dict(m.state_dict())
    m2.on_load_checkpoint(ckpt)
    monkeypatch.setattr(SuperANDModule, "current_epoch", property(lambda self: 7))
    calls.clear()
    m2.on_train_epoch_start()
    assert calls == [] and torch.equal(m2.neighbour_table, m.neighbour_table) and m2.consistency == m.consistency
    assert m.consistency is not None and 0.0 <= m.consistency <= 1.0


# ---------------------------------------------------------------------------- stage-2 module
def _twostage_module(**cfg) -> TwoStageModule:
    base = {"optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}}
    return TwoStageModule(TwoStageModel(_encoder(), num_classes=3, num_heads=4), {**base, **cfg})


def test_encoder_only_optimiser_and_fixed_heads(monkeypatch):
    torch.manual_seed(2)
    m = _twostage_module()
    opt = m.configure_optimizers()["optimizer"]
    assert opt.defaults["nesterov"] and opt.defaults["lr"] == 0.01
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    want = {id(p) for p in m.model.encoder.parameters() if p.requires_grad}
    assert in_opt == want and len(want) == sum(1 for _ in m.model.encoder.parameters()) - 4  # 4 Sobel tensors
    heads, sobel = m.model.head_weights.clone(), [p.clone() for p in m.model.encoder.sobel.parameters()]
    lin = m.model.encoder.linear.weight.clone()
    monkeypatch.setattr(m, "log", lambda *a, **k: None)
    for _ in range(2):
        opt.zero_grad()
        m.training_step((torch.randn(4, 2, 1, 8, 8), torch.zeros(4), torch.arange(4)), 0).backward()
        opt.step()
    assert torch.equal(m.model.head_weights, heads)
    assert all(torch.equal(a, b) for a, b in zip(sobel, m.model.encoder.sobel.parameters()))
    assert not torch.equal(m.model.encoder.linear.weight, lin)
    assert int(m.num_batches) == 2 and m.mi_sum.shape == (4,)


def test_lowest_mean_loss_epoch_is_kept_and_survives_resume(monkeypatch):
    m = _twostage_module()
    losses = {0: [3.0, 1.0], 1: [0.5, 0.7], 2: [2.0, 2.0]}  # epoch 1 has the lowest mean
    for epoch, batch_losses in losses.items():
        monkeypatch.setattr(TwoStageModule, "current_epoch", property(lambda self, e=epoch: e))
        m.on_train_epoch_start()
        for v in batch_losses:
            m.loss_sum += v
            m.mi_sum += torch.tensor([v, -v, 0.0, 1.0], dtype=torch.float64)
            m.num_batches += 1
        if epoch == 1:
            with torch.no_grad():
                m.model.encoder.linear.bias.fill_(7.0)
            ckpt: dict = {}
            m.on_save_checkpoint(ckpt)
            state = {k: v.clone() for k, v in m.state_dict().items()}
    m.close()
    assert m.best["epoch"] == 1 and m.best["loss"] == pytest.approx(0.6)
    assert m.best["mi_per_head"] == pytest.approx([1.2, -1.2, 0.0, 2.0])
    assert int(np.argmin(m.best["mi_per_head"])) == 1
    assert torch.all(m.best["state"]["encoder.linear.bias"] == 7.0)
    # resuming from the end of epoch 1: the sums of epoch 1 are closed at the start of epoch 2
    r = _twostage_module()
    r.load_state_dict(state)
    r.on_load_checkpoint(ckpt)
    monkeypatch.setattr(TwoStageModule, "current_epoch", property(lambda self: 2))
    r.on_train_epoch_start()
    assert r.best["epoch"] == 1 and r.best["loss"] == pytest.approx(0.6)
    # resuming mid-epoch 1 (same epoch): nothing is closed early
    r2 = _twostage_module()
    r2.load_state_dict(state)
    monkeypatch.setattr(TwoStageModule, "current_epoch", property(lambda self: 1))
    r2.on_train_epoch_start()
    assert r2.best["epoch"] == -1 and int(r2.num_batches) == 2


# --------------------------------------------------------------------------- stages on digits
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Both stages on digits, two rounds of one epoch, then two epochs of stage 2."""
    tmp = tmp_path_factory.mktemp("twostage")
    cfg = _cfg()
    cfg.update(TINY)
    cfg["superand"].update(rounds=2, epochs=1, batch_size=256, low_dim=16)
    cfg["twostage"].update(epochs=2, batch_size=256, num_heads=3)
    cfg["runtime"].update(accelerator="cpu", num_workers=0)
    data = ROOT / "data" / "digits" if (ROOT / "data" / "digits").is_dir() else tmp / "digits"

    def ctx(stage: str) -> RunContext:
        (tmp / stage).mkdir(exist_ok=True)
        return RunContext("twostage_digits", 0, stage, cfg, data, tmp / stage)

    torch.manual_seed(0)
    run_superand(ctx("superand"), tmp / "superand/model.ckpt")
    run_twostage(ctx("twostage"), tmp / "superand/model.ckpt", tmp / "twostage/model.ckpt")
    return tmp, cfg, ctx


def test_superand_checkpoint(digits_run):
    tmp, cfg, ctx = digits_run
    blob = load_model(tmp / "superand/model.ckpt", expected={"kind": "superand", "backbone": "small_cnn"})
    assert blob["arch"]["memory_size"] == 1257 and blob["arch"]["split"] == "train"
    assert blob["state_dict"]["memory"].shape == (1257, 16)
    # drop_last leaves a random 233 rows per epoch unwritten; the written ones are unit vectors
    assert int(((blob["state_dict"]["memory"].norm(dim=1) - 1).abs() < 1e-5).sum()) >= 1024
    assert blob["meta"]["round"] == 1 and blob["meta"]["epoch"] == 0
    assert blob["meta"]["num_anchors"] == int(1257 * 0.25) and 0 <= blob["meta"]["knn_top1"] <= 1
    hist = (tmp / "superand/history.csv").read_text()
    assert "val_knn_top1" in hist and "train_loss_ue" in hist
    assert not (tmp / "superand/last.ckpt").exists()


def test_twostage_checkpoint_starts_from_stage_one(digits_run):
    tmp, cfg, ctx = digits_run
    s1 = torch.load(tmp / "superand/model.ckpt", weights_only=True)
    s2 = torch.load(tmp / "twostage/model.ckpt", weights_only=True)
    assert s2["arch"]["kind"] == "twostage" and s2["arch"]["num_heads"] == 3 and s2["arch"]["num_classes"] == 10
    assert s2["state_dict"]["head_weights"].shape == (3, 16, 10)
    assert s2["meta"]["best_head"] == int(np.argmin(s2["meta"]["mi_per_head"])) and s2["meta"]["best_epoch"] in (0, 1)
    sobel = "encoder.sobel.1.weight"
    assert torch.equal(s1["state_dict"][sobel], s2["state_dict"][sobel])
    # fine-tuned: the encoder moved away from stage 1
    assert not torch.equal(s1["state_dict"]["encoder.linear.weight"], s2["state_dict"]["encoder.linear.weight"])


def test_evaluation_rows_of_both_stages(digits_run):
    tmp, cfg, ctx = digits_run
    rows1 = evaluate(ctx("superand"), tmp / "superand/model.ckpt", tmp / "superand/metrics.json")
    assert [(r["split"], r["head"], r["metric"]) for r in rows1] == [("test", "best", "knn_top1")]
    assert 0.1 < rows1[0]["value"] <= 1.0 and rows1[0]["stage"] == "superand"
    rows = evaluate(ctx("twostage"), tmp / "twostage/model.ckpt", tmp / "twostage/metrics.json")
    got = {(r["split"], r["head"], r["metric"]): r["value"] for r in rows}
    best = torch.load(tmp / "twostage/model.ckpt", weights_only=True)["meta"]["best_head"]
    for split in ("train", "test"):
        for m in ("acc", "nmi", "ari"):
            per = [got[(split, str(h), m)] for h in range(3)]
            assert got[(split, "best", m)] == per[best]
            assert got[(split, "avg", m)] == pytest.approx(np.mean(per))
    assert all(r["method"] == "twostage" and r["dataset"] == "digits" for r in rows)
    conf = json.loads((tmp / "twostage/metrics.json").read_text())["confusion"]
    assert conf["split"] == "train" and conf["head"] == best and np.asarray(conf["matrix"]).sum() == 1257


def test_stage_two_from_scratch_and_its_errors(digits_run, tmp_path):
    _, cfg, _ = digits_run
    cfg = json.loads(json.dumps(cfg))
    data = ROOT / "data" / "digits"
    ctx = RunContext("twostage_digits", 0, "twostage", cfg, data, tmp_path)
    with pytest.raises(NcdError, match="no stage-1 checkpoint was given"):
        run_twostage(ctx, None, tmp_path / "model.ckpt")
    cfg["twostage"].update(init="scratch", epochs=1)
    run_twostage(ctx, None, tmp_path / "model.ckpt")
    assert torch.load(tmp_path / "model.ckpt", weights_only=True)["meta"]["init"] == "scratch"
    with pytest.raises(NcdError, match="init is 'scratch' but a stage-1 checkpoint"):
        run_twostage(ctx, tmp_path / "model.ckpt", tmp_path / "model2.ckpt")


def test_stage_two_refuses_a_checkpoint_of_another_encoder(digits_run, tmp_path):
    tmp, cfg, _ = digits_run
    cfg = json.loads(json.dumps(cfg))
    cfg["backbone_kwargs"] = {"width": 8, "pool": 1}
    ctx = RunContext("twostage_digits", 0, "twostage", cfg, ROOT / "data" / "digits", tmp_path)
    with pytest.raises(NcdError, match="backbone_kwargs"):
        run_twostage(ctx, tmp / "superand/model.ckpt", tmp_path / "model.ckpt")


# ------------------------------------------------------------------------ paper code paths
def datafab_labels(exp_name: str) -> list[int]:
    """The labels of the split stage 2 trains on (tests/data/datafab.py): CIFAR-10's train split,
    STL-10's train + test (the paper's 13,000 labelled images, AUDIT A3)."""
    return [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] if "cifar10" in exp_name else [0, 9, 4, 2] + [5, 1, 0]


@pytest.mark.parametrize("exp_name,write,patch,n_bank", [
    ("twostage_cifar10", datafab.write_cifar10, datafab.patch_cifar10, 10),
    ("twostage_stl10", datafab.write_stl10, datafab.patch_stl10, 9),  # train + unlabeled
])
def test_paper_path_on_fabricated_files(tmp_path, monkeypatch, exp_name, write, patch, n_bank):
    root = tmp_path / "data"
    patch(monkeypatch, write(root)["md5"])
    cfg = _cfg(exp_name, ("config.yaml", "workflow/experiments/paper.yaml"))
    cfg["runtime"].update(accelerator="cpu", num_workers=0)
    assert cfg["backbone"] == "resnet18_cifar"  # the paper's trunks; tests/models/test_sobel.py runs them
    cfg.update(backbone="small_cnn", backbone_kwargs={"width": 4, "pool": 1})  # seconds, not minutes, on a CPU
    cfg["superand"].update(rounds=2, epochs=1, batch_size=2)
    cfg["twostage"].update(epochs=1, batch_size=2, num_heads=2)
    run = tmp_path / "run"

    def ctx(stage: str) -> RunContext:
        (run / stage).mkdir(parents=True, exist_ok=True)
        return RunContext(exp_name, 0, stage, cfg, root, run / stage)

    run_superand(ctx("superand"), run / "superand/model.ckpt")
    s1 = load_model(run / "superand/model.ckpt", expected={"kind": "superand", "in_channels": 3})
    assert s1["arch"]["memory_size"] == n_bank and s1["state_dict"]["memory"].shape == (n_bank, 128)
    assert s1["arch"]["split"] == ("train+unlabeled" if "stl" in exp_name else "train")
    run_twostage(ctx("twostage"), run / "superand/model.ckpt", run / "twostage/model.ckpt")
    s2 = load_model(run / "twostage/model.ckpt")
    assert s2["arch"]["split"] == ("train+test" if "stl" in exp_name else "train")
    for stage in ("superand", "twostage"):
        rows = evaluate(ctx(stage), run / stage / "model.ckpt", run / stage / "metrics.json")
        assert rows and all(r["dataset"] == cfg["dataset"] for r in rows)
        assert all(0 <= r["value"] <= 1 for r in rows if r["metric"] in ("acc", "nmi", "knn_top1"))
    conf = json.loads((run / "twostage/metrics.json").read_text())["confusion"]
    train_classes = len(set(datafab_labels(exp_name)))
    # the "train" metrics score the images stage 2 trained on: on STL-10 the 6 classes of train + test
    # (train alone has 4)
    assert conf["split"] == "train" and np.asarray(conf["matrix"]).shape == (train_classes, train_classes)


def test_official_cifar100_statistics_reach_every_transform():
    from torchvision import transforms as T

    from ncd.data import get_info
    from ncd.data.transforms import CenterCropNormalize
    from ncd.methods.superand import eval_transform, train_transform

    cfg = _cfg("twostage_cifar100-20", ("config.yaml", "workflow/experiments/paper.yaml"))
    ctx = RunContext("twostage_cifar100-20", 0, "superand", cfg, Path("unused"), Path("unused"))
    info = get_info("cifar100-20")
    for t in (train_transform(ctx, info, cfg["superand"]["augment"]), eval_transform(ctx, info)):
        # the eval transform (no resize) is the torchvision-free CenterCropNormalize, the train one a Compose
        norm = [t] if isinstance(t, CenterCropNormalize) else [op for op in t.transforms if isinstance(op, T.Normalize)]
        assert len(norm) == 1 and norm[0].std == [0.2009, 0.1984, 0.2023] and norm[0].mean == [0.5071, 0.4866, 0.4409]
    jitter = [op for op in train_transform(ctx, info, {}).transforms if isinstance(op, T.RandomApply)]
    assert jitter[0].p == 1.0  # Super-AND's colour jitter is always applied


def test_stage_two_only_ablation_is_an_optional_target(tmp_path):
    import os
    import subprocess

    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "snakemake"), "-n", "--cores", "1", "--printshellcmds", "twostage_ablation",
           "--configfile", "workflow/experiments/paper.yaml",
           "--config", f"results_dir={tmp_path}/results", f"data_dir={tmp_path}/data", f"reports_dir={tmp_path}/reports"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    stage2 = [line for line in out.splitlines() if "python -m ncd twostage " in line]
    assert len(stage2) == 5 and all("stage2only" in line and "--embed" not in line for line in stage2)
    assert "python -m ncd superand " not in out  # no stage 1 for the ablation


def test_report_puts_best_and_average_heads_beside_the_papers_rows():
    import pandas as pd

    from ncd.report import load_reported
    from ncd.report.render import paper_tables, summarise

    rows = []
    for exp, variant in (("twostage_cifar10", "lowest-loss head"), ("twostage_cifar10-stage2only", "stage 2 only")):
        for seed in (0, 1):
            for head, v in (("0", 0.7), ("1", 0.8), ("best", 0.8), ("avg", 0.75)):
                rows.append({"experiment": exp, "method": "twostage", "stage": "twostage", "dataset": "cifar10",
                             "split": "train", "seed": seed, "head": head, "metric": "acc", "value": v})
    exps = {"twostage_cifar10": {"variant": "lowest-loss head"}, "twostage_cifar10-stage2only": {"variant": "stage 2 only"}}
    summary = summarise(pd.DataFrame(rows), exps)
    assert [(r["experiment"], r["head"]) for r in summary] == [
        ("twostage_cifar10", "best"), ("twostage_cifar10", "avg"),
        ("twostage_cifar10-stage2only", "best"), ("twostage_cifar10-stage2only", "avg")]
    sections, _, _ = paper_tables(summary, load_reported(ROOT / "reports" / "reported.yaml"))
    section = next(s for s in sections if s["paper"] == "Two-stage")
    col = [c["key"] for c in section["columns"]].index(("", "train", "acc"))
    table = {(r["experiment"], r["head"]): r["cells"][col]["reported"] and r["cells"][col]["reported"]["text"]
             for r in section["rows"] if r["kind"] == "reproduced"}
    assert table[("twostage_cifar10", "best")] == "81.0" and table[("twostage_cifar10", "avg")] == "71.8"
    # the ablation has its own best-head number (supplement D) and no reported average
    assert table[("twostage_cifar10-stage2only", "best")] == "58.6"
    assert table[("twostage_cifar10-stage2only", "avg")] is None
