"""SeLa's schedule, training stage, resume and evaluation on real digits, and the CIFAR-10 paper path on
fabricated files."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torch import nn
from torch.utils.data import Dataset, RandomSampler, SequentialSampler

from ncd.checkpoint import load_model
from ncd.config import load_config, resolve_experiment
from ncd.errors import NcdError
from ncd.methods.evaluate import evaluate
from ncd.methods import sela as S
from ncd.eval.rows import selected_on_test
from ncd.methods.common import RunContext
from ncd.models.sela import SeLaModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "data"))
import datafab  # noqa: E402

N_DIGITS_TRAIN = 1257
BATCHES_256 = math.ceil(N_DIGITS_TRAIN / 256)  # 5: the official loaders keep the last partial batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def official_fire_batches(epochs_run: int, n: int, batch: int, batches_per_epoch: int, times: list[float]) -> list[int]:
    """The official loop: a list sorted descending, popped when niter * batch_size >= its last entry."""
    pending = [float("inf")] + sorted(times, reverse=True)
    fired = []
    for epoch in range(epochs_run):
        for it in range(batches_per_epoch):
            niter = epoch * batches_per_epoch + it
            if niter * batch >= pending[-1]:
                pending.pop()
                fired.append(niter)
    return fired


def test_label_step_times_are_the_official_formulas():
    n = 1000
    q = S.label_step_times("quadratic", 5, 401, n)
    assert q == pytest.approx([(401.01) * n * (i / 4) ** 2 for i in range(5)])  # (E + 1.01) N (i / (nopts-1))^2, E = 400
    lin = S.label_step_times("linear", 5, 400, n)
    assert lin == pytest.approx([401.0001 * n * i / 4 for i in range(5)])
    assert S.label_step_times("quadratic", 1, 10, n) == [0.0]
    with pytest.raises(NcdError, match="label schedule"):
        S.label_step_times("cubic", 5, 10, n)
    with pytest.raises(NcdError, match="nopts"):
        S.label_step_times("linear", 0, 10, n)
    # the official schedules never reach their last step(s)
    fired = official_fire_batches(401, n, 100, 10, q)
    assert len(fired) == 4 and fired[0] == 0


def test_initial_labels_are_equal_sized_random_partitions():
    lab = S.initial_labels(3, 103, 10, seed=0)
    assert lab.shape == (3, 103) and lab.dtype == torch.long
    for h in range(3):
        sizes = torch.bincount(lab[h], minlength=10)
        assert int(sizes.max() - sizes.min()) <= 1
    assert not torch.equal(lab[0], lab[1])
    assert torch.equal(lab, S.initial_labels(3, 103, 10, seed=0))
    assert not torch.equal(lab, S.initial_labels(3, 103, 10, seed=1))


def _digits_cfg(**sela) -> dict:
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "sela_digits")
    cfg["backbone_kwargs"] = {"width": 8, "pool": 2}
    cfg["runtime"].update(accelerator="cpu", num_workers=0)
    cfg["sela"].update(epochs=2, batch_size=256, num_heads=2, nopts=4, eval_batch_size=512,
                       linear_probe={"enabled": True, "epochs": 2, "batch_size": 512, "lr": 0.1,
                                     "momentum": 0.9, "weight_decay": 0.0, "milestones": [], "gamma": 0.1,
                                     "normalize": "none"})
    cfg["sela"].update(sela)
    return cfg


def _ctx(tmp_path: Path, cfg: dict, name: str = "sela_digits") -> RunContext:
    out = tmp_path / "run" / "sela"
    out.mkdir(parents=True, exist_ok=True)
    return RunContext(name, 0, "sela", cfg, tmp_path / "digits", out)


def test_sela_digits_stage_and_evaluation(tmp_path, monkeypatch):
    cfg = _digits_cfg()
    calls = []
    collect = S.SeLaModule.collect_features

    def counting(self):
        calls.append(self.trainer.global_step)
        # the label pass reads the training images shuffled, at eval_batch_size, keeping the last batch
        assert isinstance(self.label_loader.sampler, RandomSampler) and not self.label_loader.drop_last
        assert self.label_loader.batch_size == 512
        return collect(self)

    monkeypatch.setattr(S.SeLaModule, "collect_features", counting)
    ctx = _ctx(tmp_path, cfg)
    S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    blob = load_model(ctx.out_dir / "model.ckpt", expected={"kind": "sela", "backbone": "small_cnn"})
    arch, meta = blob["arch"], blob["meta"]
    assert (arch["num_heads"], arch["num_clusters"], arch["num_samples"]) == (2, 10, N_DIGITS_TRAIN)
    labels = blob["state_dict"]["labels"]
    assert labels.shape == (2, N_DIGITS_TRAIN) and int(labels.min()) >= 0 and int(labels.max()) < 10
    # the label steps fire where the official loop fires them (5 batches per epoch, the last one partial)
    times = S.label_step_times("quadratic", 4, 2, N_DIGITS_TRAIN)
    want = official_fire_batches(2, N_DIGITS_TRAIN, 256, BATCHES_256, times)
    assert calls == want and meta["label_steps"] == len(want) >= 2
    # one pass over the images per label step, every head relabelled from the stored features
    assert [e["head"] for e in meta["label_log"]] == [0, 1] * (len(meta["label_log"]) // 2)
    assert meta["best_head"] == int(np.argmin(meta["head_losses"]))
    assert not (ctx.out_dir / "last.ckpt").exists()

    rows = evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json")
    got = {(r["split"], r["head"], r["metric"]): r["value"] for r in rows}
    for split in ("train", "test"):
        for h in ("0", "1", "best"):
            for m in ("acc", "nmi", "ami", "ari"):
                assert (split, h, m) in got
    assert ("test", "best", "knn_top1") in got and ("test", "best", "linear_top1") in got
    assert not any(m == selected_on_test("knn_top1") for _, _, m in got)  # the kNN monitor is off by default
    assert all(r["method"] == "sela" and r["stage"] == "sela" and r["dataset"] == "digits" for r in rows)
    assert all(0 <= v <= 1 for (s, h, m), v in got.items() if m != "ari")
    b = str(meta["best_head"])
    assert got[("test", "best", "acc")] == got[("test", b, "acc")]
    # the train rows are the self-labels of the label matrix, not the heads' predictions
    from ncd.data import build_dataset
    from ncd.eval.metrics import clustering_metrics

    y = np.asarray(build_dataset("digits", tmp_path / "digits", "train").targets)
    assert got[("train", "0", "nmi")] == pytest.approx(clustering_metrics(labels[0], y)["nmi"])


def test_round_robin_linear_schedule_relabels_one_head_per_step(tmp_path):
    cfg = _digits_cfg(epochs=3, num_heads=3, nopts=4, label_schedule="linear", relabel="round_robin",
                      lamb=10, tol=0.01, linear_probe={"enabled": False})
    ctx = _ctx(tmp_path, cfg)
    S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    meta = load_model(ctx.out_dir / "model.ckpt")["meta"]
    log = meta["label_log"]
    assert log and all(e["head"] == e["epoch"] % 3 for e in log)
    assert all(e["cost"] is not None and e["cost"] > 0 for e in log)
    rows = evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json")
    assert not any(r["metric"] == "linear_top1" for r in rows)


class Stop(Exception):
    pass


def test_killed_run_resumes_with_the_same_labels(tmp_path, monkeypatch):
    cfg = _digits_cfg(epochs=3, nopts=6, linear_probe={"enabled": False})
    ctx = _ctx(tmp_path, cfg)
    start = S.SeLaModule.on_train_epoch_start

    def die_at_epoch_2(self):
        if self.current_epoch == 1:
            raise Stop
        start(self)

    monkeypatch.setattr(S.SeLaModule, "on_train_epoch_start", die_at_epoch_2)
    with pytest.raises(Stop):
        S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    last = torch.load(ctx.out_dir / "last.ckpt", map_location="cpu", weights_only=False)
    saved_labels = last["state_dict"]["model.labels"].clone()
    saved_steps = int(last["state_dict"]["steps_done"])
    assert saved_steps >= 1  # at least the label step before the first batch happened
    assert not torch.equal(saved_labels, S.initial_labels(2, N_DIGITS_TRAIN, 10, seed=0))

    seen = {}
    monkeypatch.setattr(S.SeLaModule, "on_train_epoch_start", start)

    def on_train_start(self):
        seen["labels"] = self.model.labels.clone()
        seen["steps"] = int(self.steps_done)
        seen["epoch"] = self.current_epoch

    monkeypatch.setattr(S.SeLaModule, "on_train_start", on_train_start, raising=False)
    S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    assert seen["epoch"] == 1 and seen["steps"] == saved_steps
    assert torch.equal(seen["labels"], saved_labels)
    meta = load_model(ctx.out_dir / "model.ckpt")["meta"]
    times = S.label_step_times("quadratic", 6, 3, N_DIGITS_TRAIN)
    assert meta["label_steps"] == len(official_fire_batches(3, N_DIGITS_TRAIN, 256, BATCHES_256, times))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_label_pass_mode(tmp_path, mode):
    """The official pass runs in train mode: BatchNorm uses batch statistics and updates its running ones."""
    cfg = _digits_cfg(label_pass_mode=mode)
    from ncd.data import build_dataset, get_info
    from ncd.data.wrappers import Transformed
    from ncd.methods.common import make_loader
    from ncd.models import build_backbone
    from ncd.models.sela import SeLaModel

    ctx = _ctx(tmp_path, cfg)
    info = get_info("digits", ctx.data_root)
    ds = Transformed(build_dataset("digits", ctx.data_root, "train"), S._transform(ctx, info, "train"))
    bb, dim = build_backbone("small_cnn", 1, width=8, pool=2)
    model = SeLaModel(bb, dim, 2, 10, len(ds))
    module = S.SeLaModule(model, cfg["sela"], make_loader(ds, 512, ctx, train=False), 256)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.eval()
    feats = module.collect_features()
    assert feats.shape == (len(ds), dim) and feats.dtype == torch.float32
    assert not model.training  # the mode is restored afterwards
    assert torch.equal(bn.running_mean, before) == (mode == "eval")


def test_sela_refuses_several_devices(tmp_path):
    cfg = _digits_cfg()
    cfg["runtime"]["devices"] = 2
    ctx = _ctx(tmp_path, cfg)
    with pytest.raises(NcdError, match="one device"):
        S.run_sela(ctx, ctx.out_dir / "model.ckpt")


def test_over_clustering_evaluates_with_rectangular_matching(tmp_path):
    cfg = _digits_cfg(epochs=1, num_heads=1, num_clusters=15, nopts=2, linear_probe={"enabled": False})
    ctx = _ctx(tmp_path, cfg)
    S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    rows = evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json")
    got = {(r["split"], r["head"], r["metric"]): r["value"] for r in rows}
    assert 0 < got[("test", "best", "acc")] <= 1 and ("train", "0", "ami") in got


def test_sela_cifar10_paper_path_on_fabricated_files(tmp_path, monkeypatch):
    """cifar.sh's setting: AlexNet (big) at 224 from Resize(256), 10 heads, linear schedule, one head per step."""
    root = tmp_path / "data"
    datafab.patch_cifar10(monkeypatch, datafab.write_cifar10(root)["md5"])
    cfg = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]), "sela_cifar10")
    sc = cfg["sela"]
    assert (cfg["backbone"], sc["num_heads"], sc["num_clusters"], sc["lamb"], sc["tol"]) == ("sela_alexnet", 10, 128, 10, 0.01)
    assert (sc["label_schedule"], sc["relabel"], sc["augment"]["preset"]) == ("linear", "round_robin", "cifar")
    cfg["runtime"].update(accelerator="cpu", num_workers=0)
    sc.update(epochs=1, batch_size=4, eval_batch_size=8, num_heads=2, num_clusters=4, nopts=2)
    sc["linear_probe"].update(epochs=1)
    run = tmp_path / "run" / "sela"
    run.mkdir(parents=True)
    ctx = RunContext("sela_cifar10", 0, "sela", cfg, root, run)
    S.run_sela(ctx, run / "model.ckpt")
    blob = load_model(run / "model.ckpt", expected={"kind": "sela", "backbone": "sela_alexnet"})
    assert blob["arch"]["head_init"] == "sela" and blob["state_dict"]["labels"].shape == (2, 10)
    rows = evaluate(ctx, run / "model.ckpt", run / "metrics.json")
    got = {(r["split"], r["head"], r["metric"]) for r in rows}
    assert {("test", "best", "knn_top1"), ("test", "best", "linear_top1"), ("train", "best", "ami")} <= got


# ------------------------------------------------------------------ A2: the label pass reads shuffled images
class _ClassSorted(Dataset):
    """``n`` images sorted by class (as ImageNet's folders): image ``i`` is filled with the value ``i``."""

    def __init__(self, n: int, classes: int = 10) -> None:
        self.n, self.classes = n, classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), float(i)), i * self.classes // self.n, i


class _Encode(nn.Module):
    """Features ``[i, -i]`` for image ``i``; remembers the order in which it saw the images."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)[:, :1]
        self.seen += v[:, 0].long().tolist()
        return torch.cat([v, -v], 1)


@pytest.mark.parametrize("shuffle", [True, False])
def test_label_pass_reads_shuffled_images_and_stores_them_by_index(tmp_path, shuffle):
    n = 100
    cfg = _digits_cfg(batch_size=16, eval_batch_size=0, label_pass_shuffle=shuffle)
    ctx = _ctx(tmp_path, cfg)
    loader = S.label_loader(_ClassSorted(n), ctx)
    # eval_batch_size 0: the training batch size (the official pass reads the training loader), last batch kept
    assert loader.batch_size == 16 and not loader.drop_last
    assert isinstance(loader.sampler, RandomSampler if shuffle else SequentialSampler)
    enc = _Encode()
    module = S.SeLaModule(SeLaModel(enc, 2, 1, 3, n), cfg["sela"], loader, 16)
    torch.manual_seed(0)
    feats = module.collect_features()
    # every row holds its own image's features, whatever the reading order
    assert torch.equal(feats, torch.stack([torch.arange(n), -torch.arange(n)], 1).float())
    assert sorted(enc.seen) == list(range(n))
    if shuffle:
        assert enc.seen != list(range(n))
        # a batch mixes classes (in dataset order each batch of 16 spans at most 3 of the 10 classes)
        assert len({i * 10 // n for i in enc.seen[:16]}) > 3
    else:
        assert enc.seen == list(range(n))


# ------------------------------------------------------------------ A11: steps per epoch, label schedule
@pytest.mark.parametrize("drop_last", [False, True])
def test_label_schedule_counts_the_last_partial_batch(tmp_path, monkeypatch, drop_last):
    """cifar.py/main.py count niter = epoch * len(loader) + iter over a loader that keeps the last partial
    batch: 1257 digits at 256 give 5 steps per epoch, and the linear schedule's 4th step fires at step 9,
    which a drop_last loader (4 steps per epoch, 8 in all) never reaches."""
    cfg = _digits_cfg(label_schedule="linear", nopts=6, drop_last=drop_last, linear_probe={"enabled": False})
    calls, batches = [], []
    collect = S.SeLaModule.collect_features

    def counting(self):
        calls.append(self.trainer.global_step)
        batches.append(self.trainer.num_training_batches)
        return collect(self)

    monkeypatch.setattr(S.SeLaModule, "collect_features", counting)
    ctx = _ctx(tmp_path, cfg)
    S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    per_epoch = N_DIGITS_TRAIN // 256 if drop_last else BATCHES_256
    times = S.label_step_times("linear", 6, 2, N_DIGITS_TRAIN)
    assert set(batches) == {per_epoch}
    assert calls == official_fire_batches(2, N_DIGITS_TRAIN, 256, per_epoch, times)
    assert calls == ([0, 3, 6] if drop_last else [0, 3, 6, 9])
    assert load_model(ctx.out_dir / "model.ckpt")["meta"]["label_steps"] == len(calls)


def test_a_last_batch_of_one_image_is_refused(tmp_path):
    cfg = _digits_cfg(batch_size=4, eval_batch_size=0)  # 1257 = 314 * 4 + 1
    ctx = _ctx(tmp_path, cfg)
    with pytest.raises(NcdError, match="sela.batch_size 4 leaves a last training batch of 1"):
        S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    cfg["sela"].update(batch_size=256, eval_batch_size=4)
    with pytest.raises(NcdError, match="sela.eval_batch_size 4 leaves a last label-pass batch of 1"):
        S.run_sela(ctx, ctx.out_dir / "model.ckpt")


# ------------------------------------------------------------------ A8: cifar.py's per-epoch kNN monitor
def test_knn_monitor_of_one_epoch_is_the_final_models_knn(tmp_path):
    """With one epoch the best epoch is the final model: the monitor's value (10-NN, sigma 0.1, after the
    PCA of knn_pca) equals the evaluator's kNN of the final model, and evaluate emits it as
    knn_top1_selected_on_test beside knn_top1."""
    cfg = _digits_cfg(epochs=1, nopts=2, knn_pca=16, linear_probe={"enabled": False},
                      knn_monitor={"enabled": True, "k": 10, "sigma": 0.1, "batch_size": 200})
    cfg["evaluate"].update(knn_k=10, knn_sigma=0.1)
    ctx = _ctx(tmp_path, cfg)
    S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    mon = load_model(ctx.out_dir / "model.ckpt")["meta"]["knn_monitor"]
    assert mon["best_epoch"] == 1 and mon["pca"] == 16 and (mon["k"], mon["sigma"]) == (10, 0.1)
    rows = evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json")
    got = {(r["split"], r["head"], r["metric"]): r["value"] for r in rows}
    sel = got[("test", "best", selected_on_test("knn_top1"))]
    assert sel == mon["best_top1"] and 0.1 < sel <= 1
    assert sel == pytest.approx(got[("test", "best", "knn_top1")], abs=2 / 540)  # up to near-tie flips


def test_knn_monitor_keeps_its_best_epoch_across_a_resume(tmp_path, monkeypatch):
    cfg = _digits_cfg(epochs=3, nopts=4, linear_probe={"enabled": False},
                      knn_monitor={"enabled": True, "k": 10, "sigma": 0.1, "batch_size": 600})
    ctx = _ctx(tmp_path, cfg)
    start = S.SeLaModule.on_train_epoch_start

    def die_at_epoch_3(self):
        if self.current_epoch == 2:
            raise Stop
        start(self)

    monkeypatch.setattr(S.SeLaModule, "on_train_epoch_start", die_at_epoch_3)
    with pytest.raises(Stop):
        S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    sd = torch.load(ctx.out_dir / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    with (ctx.out_dir / "history.csv").open() as f:
        first = [float(r["val_knn_top1"]) for r in csv.DictReader(f)]
    # last.ckpt of epoch 2 already holds the best of epochs 1-2 (validation runs before the epoch-end save)
    assert len(first) == 2 and float(sd["knn_best_select"]) == pytest.approx(max(first))
    assert int(sd["knn_best_epoch"]) == int(np.argmax(first))
    monkeypatch.setattr(S.SeLaModule, "on_train_epoch_start", start)
    S.run_sela(ctx, ctx.out_dir / "model.ckpt")
    with (ctx.out_dir / "history.csv").open() as f:
        knn = [float(r["val_knn_top1"]) for r in csv.DictReader(f)]
    mon = load_model(ctx.out_dir / "model.ckpt")["meta"]["knn_monitor"]
    assert len(knn) == 3 and knn[:2] == pytest.approx(first)
    assert mon["best_select_top1"] == pytest.approx(max(knn)) and mon["best_epoch"] == int(np.argmax(knn)) + 1
    assert mon["best_top1"] == mon["best_select_top1"]  # knn_pca 0: the reported value is the selection value


def test_defaults_follow_the_official_loaders():
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "sela_digits")
    sc = cfg["sela"]
    assert sc["knn_monitor"]["enabled"] is False and sc["drop_last"] is False and sc["label_pass_shuffle"] is True
    paper = resolve_experiment(load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"]),
                               "sela_imagenet_alexnet")["sela"]
    assert S.label_batch_size(paper) == paper["batch_size"] == 256
