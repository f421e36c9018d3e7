"""UNO's model, schedule and both stages on fabricated CIFAR-10 files in the real format."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler
from torch import nn

from ncd.checkpoint import load_model
from ncd.config import check_experiment, load_config, resolve_experiment
from ncd.data import build_dataset, get_info
from ncd.data.uno import build_uno_transform
from ncd.errors import NcdError, Preempted
from ncd.methods import common, training
from ncd.methods.evaluate import evaluate
from ncd.methods.common import RunContext, build_optimizer, build_scheduler
from ncd.methods.uno import discover_loader, resolve_batching, run_discover, run_pretrain_supervised
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


# --- discovery batches: mixed (UNO's CIFAR data module) or paired (its ImageNet one) ------------------

KNOWN, NOVEL = list(range(8)), [8, 9]   # a fabricated 8/2 split of digits: ~4 known images per novel one


class _Batches(L.Callback):
    """Records every training batch's targets, subset indices and view sizes."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        views = batch[0] if isinstance(batch[0], (list, tuple)) else [batch[0]]
        self.seen.append((batch[1].clone(), batch[2].clone(), [int(v.shape[0]) for v in views]))


def _digits_cfg(batching: str, batch_size: int = 64) -> dict:
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "uno_digits")
    cfg["split"] = {"known": KNOWN, "novel": NOVEL}
    cfg["runtime"].update(accelerator="cpu", devices=1, num_workers=0)
    cfg["pretrain_supervised"].update(epochs=1, batch_size=128)
    cfg["discover"].update(epochs=1, batch_size=batch_size, num_heads=1, hidden_dim=16, proj_dim=8, batching=batching)
    return check_experiment("uno_digits", cfg)  # the split and the key pass the schema


def _views(cfg: dict) -> int:
    """Views per image: UNO's 2 large crops, plus the small ones under multicrop (the digits default)."""
    d = cfg["discover"]
    return 2 + (d["num_small_crops"] if d["multicrop"] else 0)


def _train_counts() -> tuple[int, int]:
    y = np.asarray(build_dataset("digits", Path("."), "train").targets)
    return int(np.isin(y, KNOWN).sum()), int(np.isin(y, NOVEL).sum())


@pytest.fixture(scope="module")
def digits_pretrained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uno_digits_pre")
    run_pretrain_supervised(RunContext("uno_digits", 0, "pretrain_supervised", _digits_cfg("auto"), run, run),
                            run / "model.ckpt")
    return run / "model.ckpt"


def _discover(tmp_path: Path, pre: Path, cfg: dict, monkeypatch) -> _Batches:
    rec = _Batches()
    monkeypatch.setattr(training, "EXTRA_CALLBACKS", [lambda: rec])
    out = tmp_path / "discover"
    out.mkdir(exist_ok=True)
    L.seed_everything(0)
    run_discover(RunContext("uno_digits", 0, "discover", cfg, tmp_path, out), pre, out / "model.ckpt")
    return rec


def test_paired_batches_pair_known_with_cycled_novel_images(tmp_path, monkeypatch, digits_pretrained):
    """UNO's ImageNet batching: every step has b/2 known then b/2 novel rows, an epoch is one pass over
    the known images, and novel image i mod U rides with known image i (DiscoverDataset)."""
    b, (n_known, n_novel) = 64, _train_counts()
    cfg = _digits_cfg("paired", b)
    rec = _discover(tmp_path, digits_pretrained, cfg, monkeypatch)
    assert len(rec.seen) == n_known // (b // 2)  # one pass over the labeled images, last partial pair batch dropped
    lab_idx, unlab_idx = [], []
    for y, idx, sizes in rec.seen:
        assert sizes == [b] * _views(cfg) and y.shape == (b,)
        assert bool((y[: b // 2] < len(KNOWN)).all()) and bool((y[b // 2:] >= len(KNOWN)).all())
        lab_idx.append(idx[: b // 2])
        unlab_idx.append(idx[b // 2:])
    lab, unlab = torch.cat(lab_idx), torch.cat(unlab_idx)
    assert len(set(lab.tolist())) == len(lab)  # no known image twice in the epoch
    assert torch.equal(unlab, lab % n_novel)  # the novel subset cycled by index
    counts = torch.bincount(unlab, minlength=n_novel)
    assert int(counts.min()) >= 1 and int(counts.max()) >= n_known // n_novel  # each novel image seen ~L/U times
    assert (tmp_path / "discover/model.ckpt").is_file()


def test_mixed_batches_are_unchanged(tmp_path, monkeypatch, digits_pretrained):
    """auto on digits = mixed: b rows per step from one shuffled loader over all classes."""
    b, (n_known, n_novel) = 64, _train_counts()
    cfg = _digits_cfg("auto", b)
    rec = _discover(tmp_path, digits_pretrained, cfg, monkeypatch)
    assert len(rec.seen) == (n_known + n_novel) // b
    idx = torch.cat([i for _, i, _ in rec.seen])
    assert len(set(idx.tolist())) == len(idx)  # indices into one set of all train images, each once
    assert all(sizes == [b] * _views(cfg) for _, _, sizes in rec.seen)
    known_per_batch = {int((y < len(KNOWN)).sum()) for y, _, _ in rec.seen}
    assert known_per_batch != {b // 2}  # the share of novel rows varies from batch to batch


def test_paired_discovery_resumes_mid_epoch(tmp_path, monkeypatch, digits_pretrained):
    b, (n_known, _) = 64, _train_counts()
    cfg = _digits_cfg("paired", b)
    monkeypatch.setenv(common.SIGNAL_AT_STEP, "3")
    with pytest.raises(Preempted):
        _discover(tmp_path, digits_pretrained, cfg, monkeypatch)
    assert (tmp_path / "discover/last.ckpt").is_file()
    monkeypatch.delenv(common.SIGNAL_AT_STEP)
    rec = _discover(tmp_path, digits_pretrained, cfg, monkeypatch)
    assert 3 + len(rec.seen) == n_known // (b // 2)  # the rest of the epoch, in paired batches
    assert all(bool((y[: b // 2] < len(KNOWN)).all()) and bool((y[b // 2:] >= len(KNOWN)).all()) for y, _, _ in rec.seen)
    assert (tmp_path / "discover/model.ckpt").is_file()


def test_batching_auto_follows_the_dataset():
    assert resolve_batching("imagenet") == "paired" and resolve_batching("imagenet", "auto") == "paired"
    assert resolve_batching("digits") == "mixed" and resolve_batching("cifar100", "auto") == "mixed"
    assert resolve_batching("imagenet", "mixed") == "mixed" and resolve_batching("digits", "paired") == "paired"
    with pytest.raises(NcdError, match="'zipped'"):
        resolve_batching("imagenet", "zipped")
    cfg = _digits_cfg("auto")
    cfg["discover"]["batching"] = "zipped"
    with pytest.raises(NcdError, match="zipped"):
        check_experiment("uno_digits", cfg)


@pytest.mark.parametrize("backend", ["pil", "batched"])
def test_paired_loader_under_ddp_keeps_half_and_half_per_device(tmp_path, monkeypatch, backend):
    """Under DDP each rank reads its share of the pairs (as PL 1.1's DistributedSampler gave UNO) in
    batches of b/2 known + b/2 novel rows (the per-GPU sizes of --batch_size b). The loader's own
    EpochSampler is a DistributedSampler, so Lightning keeps it instead of rebuilding the loader; the
    ranks are simulated by its world size and rank. With the batched backend the rows are uint8 images
    with one key per row (epoch, the base dataset's index), concatenated as the views are."""
    from ncd.methods.common import EpochSampler

    b, (n_known, _) = 16, _train_counts()
    cfg = _digits_cfg("paired", b)
    cfg["augment"] = {"backend": backend}
    ctx = RunContext("uno_digits", 0, "discover", cfg, tmp_path, tmp_path)
    info = get_info("digits")
    t = build_uno_transform("eval", info)
    loader, _ = discover_loader(ctx, build_dataset("digits", tmp_path, "train"), KNOWN, NOVEL, [t, t])
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning's _requires_distributed_sampler: no
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(EpochSampler, "_world", lambda self, r=rank: (2, r))
        assert loader.batch_size == b // 2 and loader.drop_last
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(n_known / 2) // (b // 2)
        for views, y, idx in batches:
            if backend == "batched":
                assert views["image"].dtype == torch.uint8 and views["image"].shape[0] == b
                # b/2 different known images (the smaller novel subset is cycled, so it may repeat one)
                assert len(set(views["key"][: b // 2, 1].tolist())) == b // 2
                assert len(set(views["key"][:, 0].tolist())) == 1  # one epoch
            else:
                assert [v.shape[0] for v in views] == [b, b]
            assert int((y < len(KNOWN)).sum()) == b // 2 and int((y >= len(KNOWN)).sum()) == b // 2
            seen.append(idx[: b // 2])
    # the two ranks read disjoint pairs (at most the padding repeats)
    seen = torch.cat(seen)
    assert len(set(seen.tolist())) >= len(seen) - 1
