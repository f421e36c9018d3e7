"""benchmarks/gpu_check.py: every paper experiment's training path (step, stop with SIGUSR1, resume, artifact),
tiny on the CPU here and on CUDA where a GPU is visible; plus its pieces that need no training run."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ncd.config import load_config, resolve_experiment
from ncd.stages import STAGES, stages_of

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PAPER = ROOT / "workflow" / "experiments" / "paper.yaml"
SUMMARY = re.compile(r"gpu_check: (\d+) ok, (\d+) failed(: .*)?")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _paper() -> tuple[dict, list[str]]:
    config = load_config([ROOT / "config.yaml", PAPER])
    listed = list(config["run_experiments"])
    return config, listed + [n for n in yaml.safe_load(PAPER.read_text())["experiments"] if n not in listed]


def _expected_stages() -> set[tuple[str, str]]:
    """(experiment, stage) for every stage the stage table gives each paper experiment (only the enabled
    ones where stages_of takes the config)."""
    config, names = _paper()
    takes_cfg = len(inspect.signature(stages_of).parameters) > 1
    out = set()
    for name in names:
        exp = resolve_experiment(config, name)
        for st in (stages_of(exp["method"], exp) if takes_cfg else stages_of(exp["method"])):
            out.add((name, st.name))
    return out


def _run_tiny(device: str) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", device, "--tiny"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    tail = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-6000:]}"
    lines = r.stdout.splitlines()
    assert r.returncode == 0, tail
    m = SUMMARY.fullmatch(lines[-1])
    assert m and m[2] == "0", tail
    ok = {(x[1], x[2]): line for line in lines if (x := re.match(r"ok\s+(\S+)\s+(\S+)\s", line))}
    expected = _expected_stages()
    assert not expected - set(ok), f"no ok line for {sorted(expected - set(ok))}\n{tail}"
    n_ok = sum(line.startswith("ok ") for line in lines)
    assert int(m[1]) == n_ok == len(ok), tail  # one line per stage, all counted
    # every training stage was timed, stopped mid-epoch and resumed; the others say that they do not train
    config, _ = _paper()
    trained = {(e, s) for e, s in expected if STAGES[s].resumable
               and not (s == "pretrain" and config["experiments"][e].get("pretrain", {}).get("pretext") == "moco")}
    timed = {k for k, line in ok.items() if " img/s " in line and "resumed at step" in line}
    assert trained <= timed, f"{sorted(trained - timed)}\n{tail}"
    assert all("no training step" in ok[k] for k in expected - trained), tail


@pytest.mark.timeout(900)
def test_tiny_run_on_the_cpu():
    _run_tiny("cpu")


@pytest.mark.timeout(900)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_run_on_cuda():
    _run_tiny("cuda")


def test_unknown_experiment_is_a_clear_error():
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--experiments", "scan_cifar10", "nosuch"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "unknown experiment(s): nosuch" in r.stderr and "workflow/experiments/paper.yaml" in r.stderr, r.stderr
    assert "scan_cifar10" in r.stderr.split("expected", 1)[1]  # names what exists
    assert "gpu_check:" not in r.stdout  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    r = subprocess.run([sys.executable, str(SCRIPT), "--experiments", "scan_cifar10"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "no CUDA device is visible" in r.stderr and "--device cpu" in r.stderr, r.stderr


def test_bottleneck(gpu_check):
    assert gpu_check.bottleneck(0.05, 0.95, "cuda") == "GPU"
    assert gpu_check.bottleneck(0.05, 0.95, "cpu") == "CPU"
    assert gpu_check.bottleneck(0.3, 0.7, "cuda") == "data loader"       # 30 % of each batch spent waiting
    assert gpu_check.bottleneck(0.2, 0.8, "cuda") == "GPU"               # exactly the threshold: not yet
    assert gpu_check.bottleneck(0.0, 0.0, "cpu") == "CPU"


def test_jsonschema_stand_in_resolves_every_paper_experiment_alike():
    """The GPU machine's image has no jsonschema: the script's stand-in must fill in the same defaults."""
    code = ("import json, sys; sys.modules['jsonschema'] = None; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "assert gpu_check.JSONSCHEMA_STAND_IN; from ncd.config import resolve_experiment; "
            "c = gpu_check.load_paper_config(); "
            "print(json.dumps({n: resolve_experiment(c, n) for n in gpu_check.paper_experiments(c)}, sort_keys=True))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    config, names = _paper()
    real = json.loads(json.dumps({n: resolve_experiment(config, n) for n in names}, sort_keys=True))
    assert json.loads(r.stdout) == real


def test_torch_top_k_stand_in_finds_faiss_neighbours(gpu_check):
    pytest.importorskip("faiss")
    from ncd.methods.neighbors import knn_indices

    x = torch.nn.functional.normalize(torch.randn(300, 32, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
    ours = gpu_check.topk_knn_indices(torch.device("cpu"))(x, 10)
    assert ours.shape == (300, 11) and ours.dtype == np.int64
    assert (ours == knn_indices(x, 10)).all()
    assert (ours[:, 0] == np.arange(300)).all()  # every row is its own nearest neighbour, as with faiss


def test_the_fabricated_datasets_load_through_ncd(gpu_check, tmp_path):
    """The writers' folders are what ncd reads: torchvision's md5 check passes, sizes and labels are right, and
    UNO's ImageNet split finds its 1000 classes."""
    from ncd.data import build_dataset
    from ncd.methods.uno import resolve_split

    saved = {cls: (cls.train_list, cls.test_list, getattr(cls, "meta", None))
             for cls in (gpu_check.tvd.CIFAR10, gpu_check.tvd.CIFAR100, gpu_check.tvd.STL10)}
    try:
        rng = np.random.default_rng(0)
        gpu_check.write_cifar10(tmp_path / "c10", 12, 5, rng)
        gpu_check.write_cifar100(tmp_path / "c100", 100, 5, rng)
        gpu_check.write_stl10(tmp_path / "stl", 6, 3, rng)
        ds = build_dataset("cifar10", tmp_path / "c10", "train")
        assert len(ds) == 12 and sorted(set(ds.targets.tolist())) == list(range(10))
        assert len(build_dataset("cifar100-20", tmp_path / "c100", "test")) == 5
        assert sorted(set(build_dataset("cifar100", tmp_path / "c100", "train").targets.tolist())) == list(range(100))
        assert len(build_dataset("stl10", tmp_path / "stl", "train+unlabeled")) == 12
        wnids = gpu_check.uno_imagenet_wnid_list()
        gpu_check.write_imagenet(tmp_path / "in", gpu_check._spread(wnids, 1000), {}, gpu_check.jpeg_pool(rng, True))
        known, novel = resolve_split({"split": None, "split_name": "imagenet-B", "dataset": "imagenet"}, tmp_path / "in")
        assert (len(known), len(novel)) == (882, 30)
        assert len(build_dataset("imagenet", tmp_path / "in", "train")) == 1000
    finally:
        for cls, (train, test, meta) in saved.items():
            cls.train_list, cls.test_list = train, test
            if meta is not None:
                cls.meta = meta


@pytest.mark.timeout(900)
def test_tiny_batched_augmentation_run_on_the_cpu():
    """--augment batched --channels-last (the fast path on a GPU): SCAN's CIFAR-10 and STL-10 experiments
    (pretext, SCAN, self-labeling on the batched path, channels-last ResNet-18s) step, stop and resume through
    their real run functions."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--augment", "batched", "--channels-last",
                        "--experiments", "scan_cifar10", "scan_stl10"], cwd=ROOT, capture_output=True, text=True,
                       timeout=880)
    tail = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-6000:]}"
    assert r.returncode == 0, tail
    lines = r.stdout.splitlines()
    m = SUMMARY.fullmatch(lines[-1])
    assert m and m[2] == "0", tail
    for exp in ("scan_cifar10", "scan_stl10"):
        for stage in ("pretrain", "scan", "selflabel"):
            line = next((l for l in lines if re.match(rf"ok\s+{exp}\s+{stage}\s", l)), None)
            assert line and "resumed at step" in line, tail
    assert "augment.backend batched" in r.stdout + r.stderr, tail
    assert "runtime.channels_last" in r.stdout + r.stderr, tail
