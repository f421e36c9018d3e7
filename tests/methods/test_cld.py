"""CLD's training module on tiny real data: the NPID memory protocol, the MoCo queue and EMA key
encoder, InfoMin's jigsaw branch, skipped NaN steps, λ = 0 as the plain baseline, the original
baselines' one-query recipes (single-view NPID, MoCo v2's two crops), the backbone init, the last
partial batch, the kNN monitor's best epoch, the learning-rate schedules, the augmentations, and the
digits / CIFAR / ImageNet paths end to end (training, kNN and k-means evaluation, and on ImageNet the
cld_probe stage) on real and fabricated files."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ncd.checkpoint import load_model
from ncd.config import load_config, resolve_experiment
from ncd.data import build_dataset, get_info
from ncd.data.cld import CLDViews, JigsawCrop, build_cld_transform, build_jigsaw_transform
from ncd.errors import NcdError
from ncd.data.wrappers import Transformed
from ncd.eval.knn import weighted_knn
from ncd.methods.evaluate import evaluate
from ncd.losses import memory_bank_update, moco_logits, npid_loss
from ncd.methods.cld import CLDModule, KnnSplits, build_model, check_views, cld_lr, run_cld, train_drop_last
from ncd.methods.cld_probe import run_cld_probe
from ncd.methods.common import RunContext
from ncd.models.cld import CLDModel, build_cld_backbone
from ncd.models.resnet import ResNetSmallImages

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))
import datafab  # noqa: E402

DIGITS = get_info("digits")


# ------------------------------------------------------------------------------------ fixtures
def _digits_views(n: int, views: int, patches: bool = False) -> Dataset:
    """The first ``n`` digits, each view a fixed (deterministic) tensor, so a step can be replayed."""
    base = build_dataset("digits", "unused", "train")
    t = build_cld_transform("test", DIGITS)
    x = torch.stack([t(base[i][0]) for i in range(n)])

    class Fixed(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            v = torch.stack([torch.roll(x[i], shifts=j, dims=-1) for j in range(views)])
            if patches:
                return (v, torch.stack([torch.roll(x[i], shifts=j, dims=-2) for j in range(9)])), int(base.targets[i]), i
            return v, int(base.targets[i]), i

    return Fixed()


def _cfg(**over) -> dict:
    cfg = {"instance": "npid", "lambda": 1.0, "epochs": 1, "batch_size": 8, "low_dim": 16, "temperature": 0.1,
           "memory_momentum": 0.5, "queue_size": 32, "ema": 0.999, "jigsaw_beta": 0.5, "num_clusters": 4,
           "kmeans_iters": 5, "cld_temperature": 0.2, "detach_centroids": False, "knn_every": 0,
           "optimizer": {"name": "sgd", "lr": 0.0, "momentum": 0.9, "weight_decay": 0.0},
           "scheduler": {"name": "constant"}}
    cfg.update(over)
    return cfg


def _model(jigsaw: bool = False, head: str = "linear") -> CLDModel:
    torch.manual_seed(0)
    bb, dim = build_cld_backbone("small_cnn", 1, width=4, pool=1)
    return CLDModel(bb, dim, 16, head, mlp=jigsaw, jigsaw=jigsaw)


def _fit(module: CLDModule, ds: Dataset, batch: int, steps: int = 1) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(ds, batch_size=batch, shuffle=False))
    return trainer


# ------------------------------------------------------------------------------- NPID protocol
def test_npid_step_updates_the_memory_with_view2_then_view1():
    ds = _digits_views(8, 2)
    module = CLDModule(_model(), _cfg(), num_train=20)
    mem0 = module.memory.clone()
    s = 1 / math.sqrt(16 / 3)
    assert mem0.abs().max() <= s and mem0.shape == (20, 16)  # uniform in [-s, s], not normalised
    x, _, idx = next(iter(DataLoader(ds, batch_size=8)))
    _fit(module, ds, 8)
    with torch.no_grad():  # lr 0: the model did not move, so the step's features can be recomputed
        module.model.train()
        f1, f2 = module.model(x[:, 0], two_branch=False), module.model(x[:, 1], two_branch=False)
    want = memory_bank_update(memory_bank_update(mem0, f2, idx, 0.5), f1, idx, 0.5)
    torch.testing.assert_close(module.memory, want)
    untouched = torch.arange(8, 20)
    assert torch.equal(module.memory[untouched], mem0[untouched])


def test_nan_loss_skips_the_step_and_counts_it(monkeypatch):
    ds = _digits_views(8, 2)
    module = CLDModule(_model(), _cfg(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}),
                       num_train=8)
    before = copy.deepcopy(module.model.state_dict())
    mem0 = module.memory.clone()
    monkeypatch.setattr("ncd.methods.cld.npid_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    trainer = _fit(module, ds, 4, steps=2)
    assert int(module.nan_steps) == 2 and trainer.global_step == 0  # no optimiser step
    assert torch.equal(module.memory, mem0)
    for k, v in module.model.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BN statistics move in any forward pass
            assert torch.equal(v, before[k]), k
    assert trainer.callback_metrics["train/nan_steps"] == 2


def test_lambda_zero_is_the_plain_baseline():
    """λ = 0: the loss is the instance loss alone and the group head gets no gradient (not even
    weight decay), while the instance head trains."""
    ds = _digits_views(16, 2)
    cfg = _cfg(**{"lambda": 0.0, "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9, "weight_decay": 0.01}})
    module = CLDModule(_model(), cfg, num_train=16)
    g0, i0 = module.model.group_head.weight.clone(), module.model.inst_head.weight.clone()
    trainer = _fit(module, ds, 8, steps=2)
    m = trainer.callback_metrics
    assert "train/loss_cld" not in m and float(m["train/loss"]) == pytest.approx(float(m["train/loss_instance"]))
    assert torch.equal(module.model.group_head.weight, g0)
    assert not torch.equal(module.model.inst_head.weight, i0)
    module = CLDModule(_model(), {**cfg, "lambda": 1.0}, num_train=16)
    trainer = _fit(module, ds, 8, steps=2)
    assert not torch.equal(module.model.group_head.weight, g0)
    assert 0.0 <= float(trainer.callback_metrics["train/group_acc"]) <= 1.0


# ------------------------------------------------------------------------------ MoCo protocol
@pytest.mark.parametrize("instance,key_view", [("moco", 2), ("mocov2", 1)])
def test_moco_queue_takes_the_keys_once_per_step_and_ema_follows(instance, key_view):
    ds = _digits_views(12, 3)
    module = CLDModule(_model(), _cfg(instance=instance, ema=0.9, queue_size=10), num_train=12)
    if instance == "moco":  # CIFAR MoCo: uniform in [-s, s]; MoCo v2: normalised Gaussian
        assert module.queue.abs().max() <= 1 / math.sqrt(16 / 3)
    else:
        torch.testing.assert_close(module.queue.norm(dim=1), torch.ones(10))
    with torch.no_grad():  # a key encoder that differs from the query encoder
        for p in module.model_ema.parameters():
            p.add_(0.1)
    ema0 = copy.deepcopy(module.model_ema)
    q0 = module.queue.clone()
    x, _, _ = next(iter(DataLoader(ds, batch_size=6)))
    _fit(module, ds, 6)
    with torch.no_grad():
        ema0.train()
        keys = ema0(x[:, key_view], two_branch=False)
    assert int(module.queue_ptr) == 6
    torch.testing.assert_close(module.queue[:6], keys)
    assert torch.equal(module.queue[6:], q0[6:])
    # EMA of the parameters after the step (lr 0: the query encoder did not move)
    for (name, pe), p, p0 in zip(module.model_ema.named_parameters(), module.model.parameters(), ema0.parameters()):
        torch.testing.assert_close(pe, 0.9 * p0 + 0.1 * p, msg=name)
    # BN buffers are not averaged: the key encoder keeps its own running statistics
    bn = [k for k in module.model.state_dict() if k.endswith("running_mean")][0]
    assert not torch.allclose(module.model_ema.state_dict()[bn], module.model.state_dict()[bn])
    # the second step wraps around the ring buffer
    _fit(module, _digits_views(6, 3), 6)
    assert int(module.queue_ptr) == 2


def test_infomin_enqueues_after_each_query_view_and_uses_the_jigsaw_query():
    ds = _digits_views(8, 3, patches=True)
    module = CLDModule(_model(jigsaw=True, head="normlinear"), _cfg(instance="infomin", queue_size=20,
                       **{"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}}),
                       num_train=8)
    jig0 = module.model.jigsaw_head.fc2.weight.clone()
    _fit(module, ds, 4)
    assert int(module.queue_ptr) == 8  # 4 keys after query view 1 and again after view 2
    torch.testing.assert_close(module.queue[:4], module.queue[4:8])
    assert not torch.equal(module.model.jigsaw_head.fc2.weight, jig0)  # the jigsaw query is trained


# ---------------------------------------------------------------------------------- schedules
def test_cifar_warmup_cosine_per_iteration():
    sched = {"name": "warmup_cosine_iter", "warmup_epochs": 5, "warmup_multiplier": 100, "eta_min": 1e-6}
    lr, epochs, iters = 0.06, 20, 10

    def at(step: int) -> float:
        return cld_lr(sched, lr, epochs, step // iters, step % iters, iters, step)

    assert at(0) == pytest.approx(lr / 100)
    assert at(25) == pytest.approx(lr / 100 * (99 * 25 / 50 + 1))
    assert at(50) == pytest.approx(lr)
    warm = [at(s) for s in range(51)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    mid = 50 + (epochs - 5) * iters // 2
    assert at(mid) == pytest.approx((lr + 1e-6) / 2)
    assert at(epochs * iters) == pytest.approx(1e-6)
    cos = [at(s) for s in range(50, epochs * iters + 1)]
    assert all(a > b for a, b in zip(cos, cos[1:]))
    # no warm-up: a plain cosine over all iterations
    assert cld_lr({**sched, "warmup_epochs": 0}, lr, epochs, 0, 0, iters, 0) == pytest.approx(lr)


def test_imagenet_schedules():
    assert cld_lr({"name": "cosine_epoch"}, 0.2, 200, 0, 5, 100, 0) == pytest.approx(0.2)
    assert cld_lr({"name": "cosine_epoch"}, 0.2, 200, 100, 0, 100, 0) == pytest.approx(0.1)
    s = {"name": "infomin_cosine", "warmup_epochs": 5, "warmup_from": 0.01, "decay_rate": 0.1}
    eta = 0.2 * 0.1**3
    end_of_warmup = eta + (0.2 - eta) * (1 + math.cos(math.pi * 5 / 100)) / 2
    assert cld_lr(s, 0.2, 100, 0, 0, 50, 0) == pytest.approx(0.01)
    assert cld_lr(s, 0.2, 100, 4, 49, 50, 0) == pytest.approx(0.01 + 249 / 250 * (end_of_warmup - 0.01))
    assert cld_lr(s, 0.2, 100, 5, 0, 50, 0) == pytest.approx(eta + (0.2 - eta) * (1 + math.cos(math.pi * 6 / 100)) / 2)
    assert cld_lr(s, 0.2, 100, 99, 0, 50, 0) == pytest.approx(eta)
    with pytest.raises(NcdError, match="unknown cld scheduler"):
        cld_lr({"name": "step"}, 0.1, 10, 0, 0, 1, 0)


# ------------------------------------------------------------------------------ augmentations
def test_augmentations():
    cifar = get_info("cifar10")
    img = Image.fromarray(datafab.pattern(1, 32, 32)[0])
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(3, 1, 1)
    test = build_cld_transform("test", get_info("cifar100"))  # CIFAR-100 uses the CIFAR-10 constants
    torch.testing.assert_close(test(img), (torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255 - mean) / std)
    for kind in ("npid", "mocov2", "infomin"):
        out = build_cld_transform(kind, cifar)(img)
        assert out.shape == (3, 32, 32)
    erasing = build_cld_transform("mocov2", cifar, erasing=True)
    assert type(erasing.transforms[-1]).__name__ == "RandomErasing" and erasing.transforms[-1].p == 1.0
    npid = build_cld_transform("npid", cifar)
    names = [type(t).__name__ for t in npid.transforms]
    assert names == ["RandomResizedCrop", "ColorJitter", "RandomApply", "RandomApply", "ToTensor", "Normalize"]
    assert npid.transforms[0].scale == (0.2, 1.0)  # jitter always, then grayscale 0.2, flip 0.5
    # digits: disabled steps are left out, a 1-channel image stays 1-channel
    d = build_cld_transform("npid", DIGITS, jitter=[0.4, 0.4, 0, 0], flip_p=0.0, grayscale_p=0.0)
    assert [type(t).__name__ for t in d.transforms] == ["RandomResizedCrop", "ColorJitter", "ToTensor", "Normalize"]
    assert d(Image.fromarray(np.zeros((8, 8), np.uint8))).shape == (1, 8, 8)
    big = Image.fromarray(datafab.pattern(1, 300, 280)[0])
    assert build_cld_transform("test", get_info("imagenet"))(big).shape == (3, 224, 224)
    assert build_cld_transform("linear", get_info("imagenet")).transforms[0].scale == (0.08, 1.0)
    jig = build_jigsaw_transform(get_info("imagenet"))(big)
    assert jig.shape == (9, 3, 64, 64)
    with pytest.raises(NcdError, match="unknown CLD augmentation 'simclr'"):
        build_cld_transform("simclr", cifar)
    with pytest.raises(NcdError, match="unknown option"):
        build_cld_transform("npid", cifar, cutout=3)


def test_jigsaw_crop_takes_one_patch_per_cell():
    a = np.arange(255 * 255 * 3, dtype=np.int64).reshape(255, 255, 3) % 251
    patches = JigsawCrop()(Image.fromarray(a.astype(np.uint8)))
    assert len(patches) == 9 and all(p.size == (64, 64) for p in patches)
    for k, p in enumerate(patches):
        r, c = divmod(k, 3)
        arr = np.asarray(p)
        # the patch lies inside its 85-pixel cell: find its offset there
        hits = [(dy, dx) for dy in range(22) for dx in range(22)
                if np.array_equal(a[r * 85 + dy:r * 85 + dy + 64, c * 85 + dx:c * 85 + dx + 64], arr)]
        assert hits, k


# --------------------------------------------------------------------------------- end to end
def _ctx(tmp_path: Path, exp: str, cfg: dict, root: Path, stage: str = "cld") -> RunContext:
    out = tmp_path / "run" / stage
    out.mkdir(parents=True, exist_ok=True)
    return RunContext(exp, 0, stage, cfg, root, out)


def test_digits_npid_cld_train_and_evaluate(tmp_path):
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "cld_digits")
    cfg["backbone_kwargs"] = {"width": 8, "pool": 2}
    cfg["cld"].update(epochs=2, batch_size=128, knn_every=1, low_dim=32)
    ctx = _ctx(tmp_path, "cld_digits", cfg, tmp_path / "data")
    run_cld(ctx, ctx.out_dir / "model.ckpt")
    blob = load_model(ctx.out_dir / "model.ckpt", expected={"kind": "cld", "backbone": "small_cnn"})
    assert blob["arch"]["instance"] == "npid" and blob["meta"]["nan_steps"] == 0
    assert [e for e, _ in blob["meta"]["knn_history"]] == [1, 2]
    assert not (ctx.out_dir / "last.ckpt").exists()
    hist = (ctx.out_dir / "history.csv").read_text()
    assert "val_knn_top1" in hist and "train_loss_cld" in hist and "train_group_acc" in hist
    rows = evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json")
    got = {(r["split"], r["head"], r["metric"]): r["value"] for r in rows}
    assert set(got) == {("test", "best", m) for m in ("knn_top1", "knn_top1_selected_on_test", "acc", "nmi", "ari")}
    assert all(r["method"] == "cld" and r["stage"] == "cld" and r["dataset"] == "digits" for r in rows)
    # the kNN metric equals the monitor's last value: same features, same protocol
    history = blob["meta"]["knn_history"]
    assert got[("test", "best", "knn_top1")] == pytest.approx(history[-1][1])
    # beside it the monitor's best epoch (the official loops' "best accuracy"), chosen on the test split
    best = max(history, key=lambda t: t[1])
    assert blob["meta"]["knn_best"] == pytest.approx(best)
    assert got[("test", "best", "knn_top1_selected_on_test")] == pytest.approx(best[1])
    assert 0.3 < got[("test", "best", "knn_top1")] <= 1.0
    assert json.loads((ctx.out_dir / "metrics.json").read_text())["confusion"]["matrix"]


def test_killed_run_resumes_with_its_memory_and_monitor(tmp_path, monkeypatch):
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "cld_digits")
    cfg["backbone_kwargs"] = {"width": 4, "pool": 1}
    cfg["cld"].update(epochs=2, batch_size=256, knn_every=1, low_dim=16)
    ctx = _ctx(tmp_path, "cld_digits", cfg, tmp_path / "data")

    def crash(self) -> None:  # after epoch 1's last.ckpt is written
        raise RuntimeError("killed")

    monkeypatch.setattr(CLDModule, "on_train_epoch_end", crash, raising=False)
    with pytest.raises(RuntimeError, match="killed"):
        run_cld(ctx, ctx.out_dir / "model.ckpt")
    saved = torch.load(ctx.out_dir / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0 and saved["cld_knn_history"][0][0] == 1
    monkeypatch.undo()
    restored = {}
    monkeypatch.setattr(CLDModule, "on_train_start", lambda self: restored.update(memory=self.memory.clone()),
                        raising=False)
    run_cld(ctx, ctx.out_dir / "model.ckpt")
    torch.testing.assert_close(restored["memory"], saved["state_dict"]["memory"])
    meta = load_model(ctx.out_dir / "model.ckpt")["meta"]
    assert [e for e, _ in meta["knn_history"]] == [1, 2]
    assert meta["knn_history"][0][1] == pytest.approx(saved["cld_knn_history"][0][1])
    # the best epoch is taken over both runs' measurements: the one before the kill counts
    assert meta["knn_best"] == pytest.approx(list(max(meta["knn_history"], key=lambda t: t[1])))


@pytest.mark.parametrize("exp", ["cld_cifar10_npid"])
def test_cifar_paper_settings_on_fabricated_files(tmp_path, monkeypatch, exp):
    root = tmp_path / "data"
    datafab.patch_cifar10(monkeypatch, datafab.write_cifar10(root)["md5"])
    cfg = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]), exp)
    assert cfg["backbone"] == "resnet18_cifar" and cfg["cld"]["pool_len"] == 4
    cfg["runtime"].update(accelerator="cpu", devices=1, num_workers=0, precision="32-true")
    cfg["cld"].update(epochs=1, batch_size=4, num_clusters=3, queue_size=8, knn_every=1)
    ctx = _ctx(tmp_path, exp, cfg, root)
    run_cld(ctx, ctx.out_dir / "model.ckpt")
    arch = load_model(ctx.out_dir / "model.ckpt")["arch"]
    assert arch["head"] == ("normlinear" if "moco" in exp else "linear") and arch["pool_len"] == 4
    rows = evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json")
    assert {r["metric"] for r in rows} == {"knn_top1", "knn_top1_selected_on_test", "acc", "nmi", "ari"}


@pytest.mark.parametrize("exp", ["cld_imagenet_mocov2", "cld_imagenet_infomin"])
def test_imagenet_paper_settings_on_fabricated_files(tmp_path, exp):
    """The ImageNet settings' data path (three crops, InfoMin's jigsaw crops), instance branch and
    linear probe (its own stage, cld_probe) on a fabricated ImageNet folder; the ResNet-50 is swapped
    for the small CNN and the crops shrunk to keep the test fast (the ResNet-50 model is tested on its
    own)."""
    root = tmp_path / "imagenet"
    datafab.write_imagenet(root, ["n01440764", "n01443537"], per_class=3)
    cfg = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]), exp)
    assert cfg["backbone"] == "resnet50" and cfg["cld"]["mlp"] and cfg["cld_probe"]["epochs"] > 0
    assert cfg["cld_probe"]["precision"] == "16-mixed" and "probe" not in cfg["cld"]
    cfg["backbone"], cfg["backbone_kwargs"] = "small_cnn", {"width": 4, "pool": 1}
    cfg["runtime"].update(accelerator="cpu", devices=1, num_workers=0, precision="32-true")
    cfg["cld"].update(epochs=1, batch_size=3, queue_size=12, augment={"crop_size": 32})
    cfg["cld_probe"].update(epochs=1, batch_size=4, precision=None)  # 16-mixed needs a GPU
    cfg["evaluate"]["batch_size"] = 4
    ctx = _ctx(tmp_path, exp, cfg, root)
    run_cld(ctx, ctx.out_dir / "model.ckpt")
    arch = load_model(ctx.out_dir / "model.ckpt")["arch"]
    assert arch["mlp"] and arch["head"] == "normlinear" and arch["jigsaw"] == (exp == "cld_imagenet_infomin")
    # kNN and k-means are off on ImageNet: the cld stage itself has no rows there
    assert evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json") == []
    probe = _ctx(tmp_path, exp, cfg, root, stage="cld_probe")
    run_cld_probe(probe, ctx.out_dir / "model.ckpt", probe.out_dir / "model.ckpt")
    rows = evaluate(probe, probe.out_dir / "model.ckpt", probe.out_dir / "metrics.json")
    # the final probe, and (when the probe validated every epoch) its best epoch beside it
    got = [(r["stage"], r["split"], r["metric"]) for r in rows]
    assert got[0] == ("cld_probe", "test", "linear_top1")
    assert set(got[1:]) <= {("cld_probe", "test", "linear_top1_selected_on_test")}
    assert 0.0 <= rows[0]["value"] <= 1.0


def test_bad_instance_is_named():
    with pytest.raises(NcdError, match="unknown cld.instance 'simclr'"):
        CLDModule(_model(), _cfg(instance="simclr"), num_train=4)


def test_views_dataset():
    base = build_dataset("digits", "unused", "test")
    t = build_cld_transform("npid", DIGITS, flip_p=0.0, grayscale_p=0.0)
    views, y, i = CLDViews(base, [t, t, t])[5]
    assert views.shape == (3, 1, 8, 8) and y == int(base.targets[5]) and i == 5


# ------------------------------------------------------------- the original baselines (AUDIT A4)
def test_single_view_npid_uses_one_view_for_loss_and_memory():
    """NPID's cifar.py: one view per image reaches the loss (CE on the memory before the step), and the
    memory rows of the batch then take that view's features (m 0.5)."""
    ds = _digits_views(8, 1)
    module = CLDModule(_model(), _cfg(views=1, **{"lambda": 0.0}), num_train=12)
    mem0 = module.memory.clone()
    x, _, idx = next(iter(DataLoader(ds, batch_size=8)))
    assert x.shape[1] == 1
    trainer = _fit(module, ds, 8)
    with torch.no_grad():  # lr 0: the step's features can be recomputed
        module.model.train()
        f = module.model(x[:, 0], two_branch=False)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(npid_loss(f, idx, mem0, 0.1)), rel=1e-5)
    torch.testing.assert_close(module.memory, memory_bank_update(mem0, f, idx, 0.5))
    assert torch.equal(module.memory[8:], mem0[8:])
    # the CLD term needs two query views; a view count of no recipe is refused
    with pytest.raises(NcdError, match="cld.views 1 .* needs cld.lambda 0"):
        check_views("npid", 1, 1.0)
    with pytest.raises(NcdError, match="cld.views 3 does not fit cld.instance 'npid'"):
        check_views("npid", 3, 0.0)
    with pytest.raises(NcdError, match="cld.views 2 does not fit cld.instance 'infomin'"):
        check_views("infomin", 2, 0.0)
    assert check_views("mocov2", None, 0.25) == 3 and check_views("mocov2", 2, 0.0) == 2


def test_mocov2_two_crops_one_query_one_key():
    """main_moco.py: crop 1 is the query, crop 2 the key from the EMA encoder; the loss is that one
    query's InfoNCE, and the queue then takes the keys."""
    ds = _digits_views(6, 2)
    module = CLDModule(_model(), _cfg(instance="mocov2", views=2, ema=0.9, queue_size=10, temperature=0.2,
                                      **{"lambda": 0.0}), num_train=6)
    with torch.no_grad():  # a key encoder that differs from the query encoder
        for p in module.model_ema.parameters():
            p.add_(0.1)
    ema0, q0 = copy.deepcopy(module.model_ema), module.queue.clone()
    x, _, _ = next(iter(DataLoader(ds, batch_size=6)))
    trainer = _fit(module, ds, 6)
    with torch.no_grad():
        ema0.train()
        module.model.train()
        keys = ema0(x[:, 1], two_branch=False)
        q = module.model(x[:, 0], two_branch=False)
    want = torch.nn.functional.cross_entropy(moco_logits(q, keys, q0, 0.2), torch.zeros(6, dtype=torch.long))
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(float(want), rel=1e-5)
    assert int(module.queue_ptr) == 6  # one key per image, not two
    torch.testing.assert_close(module.queue[:6], keys)
    for pe, p, p0 in zip(module.model_ema.parameters(), module.model.parameters(), ema0.parameters()):
        torch.testing.assert_close(pe, 0.9 * p0 + 0.1 * p)


def test_lemniscate_step_schedule():
    s = {"name": "multistep", "milestones": [120, 160], "gamma": 0.1}
    assert [cld_lr(s, 0.03, 200, e, 0, 10, 0) for e in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])


def test_knn_monitor_on_the_memory_bank():
    """NPID's cifar.py monitors kNN against the memory bank (recompute_memory=0): only the test images
    are embedded, the memory rows are the train features."""
    base = build_dataset("digits", "unused", "train")
    n, n_test = 16, 8
    t = build_cld_transform("test", DIGITS)
    train_eval = Transformed(torch.utils.data.Subset(base, range(n)), t)
    test_eval = Transformed(torch.utils.data.Subset(build_dataset("digits", "unused", "test"), range(n_test)), t)
    val = KnnSplits(train_eval, test_eval, train_rows=False)
    assert len(val) == n_test and val[0][2] == n
    labels = torch.as_tensor(base.targets[:n], dtype=torch.long)
    cfg = _cfg(views=1, knn_every=1, knn_train_features="memory", **{"lambda": 0.0})
    module = CLDModule(_model(), cfg, num_train=n, num_classes=10, num_knn_train=n, knn_k=5, knn_train_labels=labels)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(_digits_views(n, 1), batch_size=8), DataLoader(val, batch_size=4))
    with torch.no_grad():
        module.model.eval()
        f = module.model(torch.stack([test_eval[i][0] for i in range(n_test)]), two_branch=False)
    y = torch.as_tensor([test_eval[i][1] for i in range(n_test)])
    want = weighted_knn(module.memory, labels, f, y, 10, k=5, sigma=0.1)["top1"]
    assert module.knn_history == [(1, pytest.approx(want))]
    with pytest.raises(NcdError, match="needs NPID's memory bank"):
        CLDModule(_model(), _cfg(instance="moco", knn_train_features="memory"), num_train=4)


def test_knn_best_is_the_earliest_best_epoch():
    module = CLDModule(_model(), _cfg(), num_train=4)
    assert module.knn_best is None
    module.knn_history = [(1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6)]
    assert module.knn_best == (2, 0.7)


# -------------------------------------------------------------------- backbone init (AUDIT A7)
def _convs(m: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]


def test_cld_backbone_keeps_pytorchs_default_conv_init():
    """CLD's models/resnet_cifar.py has no init loop: convs keep kaiming_uniform(a = sqrt 5), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); SCAN's users keep Kaiming-normal(fan_out)."""
    torch.manual_seed(0)
    root = Path("unused")
    cfg = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]),
                             "cld_cifar10_npid")
    assert cfg["cld"]["backbone_init"] == "torch"
    model, _ = build_model(RunContext("cld_cifar10_npid", 0, "cld", cfg, root, root), get_info("cifar10"))
    for conv in _convs(model.backbone):
        w = conv.weight.detach()
        bound = 1 / math.sqrt(w[0].numel())
        assert w.abs().max() <= bound
        if w.numel() > 50_000:  # uniform: std = bound / sqrt(3)
            assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    kaiming, _ = build_cld_backbone("resnet18_cifar", 3, 4)  # the registry's (SCAN's) init
    assert isinstance(kaiming, ResNetSmallImages)
    w = _convs(kaiming)[-2].weight.detach()  # layer4's last 3x3 conv, fan_out = fan_in = 4608
    assert float(w.std()) == pytest.approx(math.sqrt(2 / (w.shape[0] * w[0, 0].numel())), rel=0.05)
    assert w.abs().max() > 1 / math.sqrt(w[0].numel())  # the normal tail leaves the uniform bound
    with pytest.raises(NcdError, match="unknown ResNet init 'xavier'"):
        ResNetSmallImages(init="xavier")


# ------------------------------------------------------------------ last partial batch (AUDIT A10)
def test_last_partial_batch_is_kept_and_clustered(tmp_path, monkeypatch):
    """CLD's CIFAR loaders keep the last batch; k-means then sees fewer rows than groups, as CLD's KMeans
    does (no error). MoCo v2's main_moco.py drops it."""
    assert [train_drop_last(i, None) for i in ("npid", "moco", "mocov2", "infomin")] == [False, False, True, False]
    assert train_drop_last("mocov2", False) is False and train_drop_last("npid", True) is True
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "cld_digits")
    cfg["backbone_kwargs"] = {"width": 4, "pool": 1}
    cfg["cld"].update(epochs=1, batch_size=400, num_clusters=64, knn_every=0, low_dim=8)
    sizes: list[int] = []
    import ncd.methods.cld as cld_mod

    real = cld_mod.cld_loss

    def spy(f1, f2, num_clusters, *a, **k):
        sizes.append(f1.shape[0])
        return real(f1, f2, num_clusters, *a, **k)

    monkeypatch.setattr(cld_mod, "cld_loss", spy)
    ctx = _ctx(tmp_path, "cld_digits", cfg, tmp_path / "data")
    run_cld(ctx, ctx.out_dir / "model.ckpt")
    assert sizes == [400, 400, 400, 1257 - 3 * 400]  # 57 rows < 64 groups
    assert load_model(ctx.out_dir / "model.ckpt")["meta"]["nan_steps"] == 0
