"""Pieces of the methods: neighbour sampling, schedules, EMA, self-label skipping, MoCo import, k-NN mining."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ncd.checkpoint import load_model
from ncd.config import load_config, resolve_experiment
from ncd.data.wrappers import NeighborsDataset
from ncd.errors import NcdError
from ncd.methods.common import RunContext, build_optimizer, build_scheduler
from ncd.methods.neighbors import knn_indices, neighbor_agreement
from ncd.methods.selflabel import EMA, SelfLabelModule
from ncd.models import ClusteringModel, build_backbone

ROOT = Path(__file__).resolve().parents[2]


class _Base(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor(float(i)), i % 3


def test_neighbors_dataset_draws_from_first_k_plus_one_columns_self_included():
    n, k = 5, 2
    table = np.array([[i, (i + 1) % n, (i + 2) % n, (i + 3) % n] for i in range(n)])
    ds = NeighborsDataset(_Base(n), table, lambda x: x, lambda x: x, num_neighbors=k)
    np.random.seed(0)
    seen = {int(ds[0][1]) for _ in range(200)}
    assert seen == {0, 1, 2}  # self (column 0) included, column 3 never
    with pytest.raises(NcdError, match="3 rows, expected 5"):
        NeighborsDataset(_Base(5), table[:3], lambda x: x, lambda x: x, 2)


@pytest.mark.parametrize("epochs,lr,factor", [(10, 0.4, 1e-3), (500, 0.4, 1e-3), (7, 1.0, 0.1)])
def test_cosine_schedule_is_scans_formula(epochs, lr, factor):
    opt = build_optimizer([nn.Parameter(torch.zeros(1))], {"name": "sgd", "lr": lr})
    sched = build_scheduler(opt, {"name": "cosine", "eta_min_factor": factor}, epochs)
    eta_min = lr * factor
    for e in range(min(epochs, 12)):
        want = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * e / epochs)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9)
        opt.step()
        sched.step()


def test_optimizer_and_scheduler_errors():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(NcdError, match="'lamb'"):
        build_optimizer(p, {"name": "lamb", "lr": 1.0})
    with pytest.raises(NcdError, match="'step'"):
        build_scheduler(build_optimizer(p, {"name": "adam", "lr": 1.0}), {"name": "step"}, 3)


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize("mode", ["official", "fixed"])
def test_ema_modes(mode):
    torch.manual_seed(0)
    m = _bn_model()
    ema = EMA(m, alpha=0.9, mode=mode)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    m(torch.randn(8, 3) * 5 + 3)  # moves BN running stats
    with torch.no_grad():
        m[0].weight.add_(1.0)  # a "gradient step"
    live_weight = m[0].weight.detach().clone()
    live_mean = m[1].running_mean.clone()
    ema.step(m)
    expected_w = 0.9 * start["0.weight"] + 0.1 * live_weight
    assert torch.allclose(ema.shadow["0.weight"], expected_w)
    if mode == "official":
        # SCAN's code writes the shadow back, BN statistics included: they snap back to the start
        assert torch.allclose(m[0].weight, expected_w)
        assert torch.equal(m[1].running_mean, start["1.running_mean"])
    else:
        assert torch.equal(m[0].weight.detach(), live_weight)
        assert torch.equal(ema.shadow["1.running_mean"], live_mean)
    with pytest.raises(NcdError, match="'bogus'"):
        EMA(m, 0.9, mode="bogus")


def test_selflabel_skips_batches_without_confident_predictions():
    bb, d = build_backbone("small_cnn", 1, width=4, pool=1)
    model = ClusteringModel(bb, d, 10, 1)
    nn.init.zeros_(model.cluster_head[0].weight)  # uniform predictions: nothing above 0.99
    module = SelfLabelModule(model, {"confidence_threshold": 0.99, "optimizer": {"name": "adam", "lr": 1e-3}})
    module.log = lambda *a, **k: None
    x = torch.randn(4, 1, 8, 8)
    assert module.training_step((x, x, torch.zeros(4), torch.arange(4)), 0) is None
    assert module.skipped == 1
    module.cfg["confidence_threshold"] = 0.05
    loss = module.training_step((x, x, torch.zeros(4), torch.arange(4)), 0)
    assert loss is not None and loss.requires_grad


def test_knn_mining_and_agreement():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8))
    x = np.concatenate([c + 0.01 * rng.normal(size=(10, 8)) for c in centers]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = knn_indices(x, 4)
    assert idx.shape == (30, 5)
    assert (idx[:, 0] == np.arange(30)).all()  # the sample itself comes first
    labels = np.repeat(np.arange(3), 10)
    assert neighbor_agreement(idx, labels) == 1.0
    assert neighbor_agreement(idx, np.zeros(30, int)) == 1.0
    shuffled = labels.copy()
    shuffled[0] = 2
    assert neighbor_agreement(idx, shuffled) < 1.0


def test_knn_mining_moves_the_index_to_the_gpus_when_faiss_has_gpu_support(monkeypatch):
    import faiss

    from ncd.methods.neighbors import gpu_search_available

    assert not gpu_search_available(type("CpuOnly", (), {})())
    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or index, raising=False)
    x = np.eye(6, dtype=np.float32)
    idx = knn_indices(x, 2)
    assert len(moved) == 1 and isinstance(moved[0], faiss.IndexFlatIP)
    assert (idx[:, 0] == np.arange(6)).all()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)  # faiss-gpu on a CPU-only node
    knn_indices(x, 2)
    assert len(moved) == 1


def _ctx(tmp_path: Path, **pretrain) -> RunContext:
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "scan_digits")
    cfg["backbone"] = "resnet18"
    cfg["pretrain"].update(pretext="moco", **pretrain)
    return RunContext("scan_digits", 0, "pretrain", cfg, tmp_path / "data" / "digits", tmp_path / "out")


def _moco_file(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint in MoCo's layout: encoder_q/encoder_k under DataParallel's 'module.' prefix."""
    bb, _ = build_backbone("resnet18", 1)
    state = {f"module.encoder_q.{k}": v for k, v in bb.state_dict().items()}
    state.update({"module.encoder_q.fc.0.weight": torch.zeros(2, 2), "module.queue": torch.zeros(2, 2)})
    state.update({f"module.encoder_k.{k}": v for k, v in bb.state_dict().items()})
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state}, path)
    return bb.state_dict()


def test_moco_import_from_local_file(tmp_path):
    from ncd.methods.simclr import run_pretrain

    src = tmp_path / "moco.pth.tar"
    want = _moco_file(src)
    out = tmp_path / "out" / "model.ckpt"
    run_pretrain(_ctx(tmp_path, checkpoint=str(src)), out)
    blob = load_model(out, expected={"kind": "contrastive", "head": "identity"})
    assert torch.equal(blob["state_dict"]["backbone.conv1.weight"], want["conv1.weight"])
    assert blob["meta"]["pretext"] == "moco"


def test_moco_import_downloads_a_url_once_into_data_weights(tmp_path, monkeypatch):
    import shutil

    from ncd.methods import simclr
    from ncd.methods.simclr import run_pretrain

    src = tmp_path / "served.pth.tar"
    _moco_file(src)
    calls = []

    def fake_download(url, root, filename=None, md5=None, **kw):
        calls.append(url)
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, Path(root) / filename)

    monkeypatch.setattr(simclr, "download_url", fake_download)
    url = "https://example.org/moco_v2_800ep_pretrain.pth.tar"
    for _ in range(2):
        run_pretrain(_ctx(tmp_path, checkpoint=url), tmp_path / "out" / "model.ckpt")
    assert calls == [url]
    assert (tmp_path / "data" / "weights" / "moco_v2_800ep_pretrain.pth.tar").is_file()


def test_moco_import_errors(tmp_path):
    from ncd.methods.simclr import run_pretrain

    with pytest.raises(NcdError, match="does not exist"):
        run_pretrain(_ctx(tmp_path, checkpoint=str(tmp_path / "nope.pth")), tmp_path / "o.ckpt")
    with pytest.raises(NcdError, match="checkpoint is empty"):
        run_pretrain(_ctx(tmp_path, checkpoint=""), tmp_path / "o.ckpt")
    bad = tmp_path / "other.pth"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, bad)
    with pytest.raises(NcdError, match="does not fit"):
        run_pretrain(_ctx(tmp_path, checkpoint=str(bad)), tmp_path / "o.ckpt")
    assert not (tmp_path / "o.ckpt").exists()


def test_head_only_scan_keeps_the_backbone_in_eval_mode_when_a_run_resumes_mid_epoch():
    """Lightning 2.6 calls no on_train_epoch_start for the epoch a run resumes in: on_train_start must
    put the frozen backbone's BatchNorm back in eval mode (the official code trains with model.eval())."""
    from ncd.methods.scan import SCANModule

    backbone, dim = build_backbone("resnet18_cifar", 3)
    module = SCANModule(ClusteringModel(backbone, dim, 4, 1), {"update_cluster_head_only": True}, None)
    module.train()
    bns = [m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    module.on_train_start()
    assert not any(m.training for m in bns)


def test_make_loader_defaults_and_overrides(tmp_path):
    """Train loaders shuffle and drop the last partial batch unless an official loader says otherwise
    (CLD's CIFAR loaders keep it, SeLa's label pass reads shuffled): the keyword overrides."""
    from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

    from ncd.methods.common import EpochSampler, make_loader

    ds = TensorDataset(torch.arange(10))
    ctx = RunContext("e", 0, "s", {"runtime": {"num_workers": 0}}, tmp_path, tmp_path)
    train, ev = make_loader(ds, 4, ctx, train=True), make_loader(ds, 4, ctx, train=False)
    assert (len(train), train.drop_last, isinstance(train.sampler, EpochSampler), train.sampler.shuffle) == \
        (2, True, True, True)
    assert (len(ev), ev.drop_last, isinstance(ev.sampler, SequentialSampler)) == (3, False, True)
    keep = make_loader(ds, 4, ctx, train=True, drop_last=False)
    assert len(keep) == 3 and keep.sampler.shuffle
    assert sorted(int(i) for (b,) in keep for i in b) == list(range(10))
    assert [int(i) for (b,) in keep for i in b] != list(range(10))  # shuffled
    shuffled = make_loader(ds, 4, ctx, train=False, shuffle=True)
    assert len(shuffled) == 3 and isinstance(shuffled.sampler, RandomSampler)
    assert len(make_loader(ds, 16, ctx, train=True, drop_last=False)) == 1  # smaller than a batch: one batch
    with pytest.raises(NcdError, match="batch_size 16 .* larger than its 10 training images"):
        make_loader(ds, 16, ctx, train=True)


def test_training_order_and_augmentation_are_functions_of_seed_epoch_and_index(tmp_path):
    """The resumable training loader: each epoch's order comes from (seed, epoch); each sample's random
    draws from (seed, epoch, index), whichever worker loads it; a restored state skips exactly the batches
    already handed out, and a complete epoch's state resumes at the next epoch."""
    from torch.utils.data import Dataset

    from ncd.methods.common import make_loader

    class Noisy(Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int):
            return torch.rand(()), i  # the "augmentation": a draw from the global generator

    def run(seed: int, epoch: int, workers: int = 0, state: dict | None = None):
        ctx = RunContext("e", seed, "s", {"runtime": {"num_workers": workers}}, tmp_path, tmp_path)
        loader = make_loader(Noisy(), 3, ctx, train=True)
        loader.sampler.set_epoch(epoch)
        if state is not None:
            loader.load_state_dict(state)
        return [(float(x), int(i)) for xb, ib in loader for x, i in zip(xb, ib)], loader

    a, _ = run(0, 0)
    assert run(0, 0)[0] == a and run(0, 0, workers=2)[0] == a  # workers change nothing
    assert sorted(i for _, i in a) == list(range(12))
    assert [i for _, i in run(0, 1)[0]] != [i for _, i in a]  # a new order every epoch
    assert [i for _, i in run(1, 0)[0]] != [i for _, i in a]  # and every seed
    assert dict((i, x) for x, i in run(1, 0)[0]) != dict((i, x) for x, i in a)
    # position: 2 of 4 batches handed out, then a restart
    _, loader = run(0, 0)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches": 2, "length": 4}
    rest, _ = run(0, 5, state=state)  # the restored epoch wins over the default one
    assert rest == a[6:]
    nxt, _ = run(0, 0, state={"epoch": 0, "batches": 4, "length": 4})
    assert nxt == run(0, 1)[0]
    with pytest.raises(NcdError, match="batches per epoch"):
        run(0, 0, state={"epoch": 0, "batches": 1, "length": 7})


def test_backbone_summary_counts_the_backbones_parameters():
    """metrics.json names the backbone and its parameter count (the report's table across methods)."""
    from ncd.methods.evaluate import backbone_summary
    from ncd.models.backbones import build_backbone

    arch = {"backbone": "small_cnn", "in_channels": 1, "backbone_kwargs": {"width": 8, "pool": 2}}
    net, dim = build_backbone("small_cnn", 1, width=8, pool=2)
    got = backbone_summary(arch)
    assert got == {"name": "small_cnn", "kwargs": {"width": 8, "pool": 2},
                   "params": sum(p.numel() for p in net.parameters()), "feature_dim": dim}
    assert backbone_summary({"backbone": "resnet18_cifar", "in_channels": 3})["params"] == 11_168_832
    assert backbone_summary({"kind": "kmeans", "backbone": "pixels"}) is None and backbone_summary(None) is None
