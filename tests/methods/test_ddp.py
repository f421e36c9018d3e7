"""Every multi-device path on the CPU: Lightning's DDP over gloo with two processes (AUDIT.md part B).

Each stage runs as the workflow runs it, ``python -m ncd <stage> ...`` in a subprocess; Lightning's
launcher starts the second rank by re-running that command. The checks: the run completes, exactly
one artifact and one history are written (by rank 0), the best head is chosen from every rank's
statistics, a stop signal that reaches one rank mid-epoch stops both (last.ckpt is written) and the
rerun resumes with two processes, a NaN on one rank is skipped by both without a hang, and stages
that must see every sample in one process refuse several devices with a clear error.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ncd.checkpoint import load_model
from ncd.cli import main
from ncd.config import load_config, stage_config
from ncd.data import get_info
from ncd.eval import scan_head_losses
from ncd.methods.cld import NAN_AT_STEP
from ncd.methods.common import SIGNAL_AT_STEP, RunContext, collect, eval_loader, restore
from ncd.stages import STAGES, artifact

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)

EXPERIMENT = {"scan": "scan_digits", "uno": "uno_digits", "cld": "cld_digits", "sela": "sela_digits",
              "twostage": "twostage_digits"}
SHRINK = {
    "pretrain": {"epochs": 1, "batch_size": 128},
    "mine": {"topk": 5, "topk_val": 3},
    "scan": {"epochs": 2, "batch_size": 128, "num_heads": 3},
    "selflabel": {"epochs": 2, "batch_size": 64, "confidence_threshold": 0.5,
                  "ema": {"enabled": True, "alpha": 0.99, "mode": "official"}},
    "pretrain_supervised": {"epochs": 1, "batch_size": 64},
    "discover": {"epochs": 2, "batch_size": 64, "num_heads": 3, "hidden_dim": 32, "proj_dim": 16},
    # CLD's ImageNet code path (MoCo v2: three views, queue, EMA key encoder) with per-GPU BatchNorm,
    # so that the key batch is shuffled across the two ranks, on a small backbone
    "cld": {"instance": "mocov2", "augmentation": "mocov2", "mlp": True, "queue_size": 512, "epochs": 1,
            "batch_size": 64, "num_clusters": 8, "knn_every": 1, "scheduler": {"name": "cosine_epoch"}},
    # the ImageNet linear probe on the CLD trunk: 64 images per step over both ranks
    "cld_probe": {"epochs": 1, "batch_size": 64, "lr": 0.1, "milestones": [1], "augmentation": "linear"},
    "sela": {"epochs": 1, "nopts": 1, "batch_size": 64},
    "superand": {"rounds": 1, "epochs": 1, "batch_size": 64},
    "twostage": {"init": "scratch", "epochs": 1, "batch_size": 64},
}


@pytest.fixture(scope="module")
def config() -> dict:
    cfg = load_config([ROOT / "config.yaml"])
    for stage, over in SHRINK.items():
        exp = cfg["experiments"][EXPERIMENT[STAGES[stage].method]]
        exp[stage] = {**exp.get(stage, {}), **over}
    # MoCo v2's augmentation has a Gaussian blur, which only the PIL path makes (UNO keeps the default's
    # batched views: both backends run under DDP here)
    cfg["experiments"]["cld_digits"]["augment"] = {"backend": "pil"}
    for name, exp in cfg["experiments"].items():
        exp["runtime"] = {**exp.get("runtime", {}), "accelerator": "cpu", "devices": 2, "threads": 1,
                          "signal_sync_every": 1, "sync_batchnorm": name != "cld_digits"}
    return cfg


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp")


def _args(config: dict, work: Path, stage: str, evaluate: bool = False) -> list[str]:
    exp = EXPERIMENT[STAGES[stage].method]
    out = work / artifact(stage)
    target = out.parent / "metrics.json" if evaluate else out
    slice_file = out.parent / (".eval.json" if evaluate else ".slice.json")
    slice_file.parent.mkdir(parents=True, exist_ok=True)
    slice_file.write_text(json.dumps(stage_config(config, exp, stage, evaluate)))
    args = ["--experiment", exp, "--seed", "0", "--config", f"@{slice_file}", "--data-root", str(work / "digits"),
            "--out", str(target), "--threads", "1"]
    if evaluate:
        return args + ["--ckpt", str(out), "--stage", stage]
    for name, up in STAGES[stage].inputs_for(config["experiments"][exp]).items():
        args += [f"--{name.replace('_', '-')}", str(work / artifact(up))]
    return args


def _run(config: dict, work: Path, stage: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m ncd <stage>`` with two CPU processes; a hang fails the test at its timeout."""
    log = work / stage / "run.log"
    r = subprocess.run([sys.executable, "-m", "ncd", stage, *_args(config, work, stage), "--log", str(log)],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return r


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-4000:]


def _history_epochs(run: Path) -> list[int]:
    with (run / "history.csv").open() as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f)]


def _assert_one_artifact(work: Path, stage: str, epochs: list[int]) -> dict:
    run = work / stage
    files = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert files.count("model.ckpt") == 1 and "last.ckpt" not in files and "last.ckpt.config" not in files, files
    assert not [p for p in files if p.endswith(".tmp")], files
    assert _history_epochs(run) == epochs  # one history, written by rank 0 only
    assert (run / "run.log.rank1").is_file()  # rank 1 logged beside the rule's log, not over it
    return load_model(run / "model.ckpt")


def _preempt_and_resume(config: dict, work: Path, stage: str, at: int) -> subprocess.CompletedProcess:
    """Rank 0 alone receives SIGUSR1 after step ``at``: both ranks stop, last.ckpt is written, the
    step fails (as a time-limit kill does); the rerun resumes mid-epoch with two processes."""
    first = _run(config, work, stage, **{SIGNAL_AT_STEP: str(at)})
    assert first.returncode != 0, first.stderr[-3000:]
    assert "received SIGUSR1" in first.stderr and "received a signal on another rank" in first.stderr, \
        first.stderr[-3000:]
    run = work / stage
    assert (run / "last.ckpt").is_file() and not (run / "model.ckpt").exists()
    step = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert at <= step < at + 3  # stopped mid-epoch, at the batch where the ranks agreed
    second = _run(config, work, stage)
    _ok(second)
    assert "resuming stage" in second.stderr
    return second


def test_uno_pretraining_and_discovery_on_two_processes(config, work):
    _ok(_run(config, work, "pretrain_supervised"))
    _assert_one_artifact(work, "pretrain_supervised", [1])
    second = _preempt_and_resume(config, work, "discover", at=3)
    blob = _assert_one_artifact(work, "discover", [1, 2])
    # the head is chosen on the loss summed over both ranks' shares of the last epoch
    shares = {int(r): json.loads(v) for r, v in re.findall(
        r"\[rank (\d+)\] summed cluster loss per head over this rank's share: (\[.*\])", second.stderr)}
    rank0 = re.findall(r"INFO ncd: summed cluster loss per head over this rank's share: (\[.*\])", second.stderr)
    assert len(shares) == 1 and 1 in shares and len(rank0) == 1, second.stderr[-3000:]
    total = np.asarray(json.loads(rank0[0])) + np.asarray(shares[1])
    np.testing.assert_allclose(blob["meta"]["loss_per_head"], total, rtol=1e-5)
    assert blob["meta"]["best_head"] == int(np.argmin(total))
    # one process evaluates: one set of metrics rows
    assert main(["evaluate", *_args(config, work, "discover", evaluate=True)]) == 0
    rows = json.loads((work / "discover" / "metrics.json").read_text())["rows"]
    keys = [(r["split"], r["head"], r["metric"]) for r in rows]
    assert rows and len(keys) == len(set(keys))


def test_scan_stages_on_two_processes(config, work):
    _ok(_run(config, work, "pretrain"))
    _assert_one_artifact(work, "pretrain", [1])
    assert main(["mine", *_args(config, work, "mine")]) == 0
    _ok(_run(config, work, "scan"))
    blob = _assert_one_artifact(work, "scan", [1, 2])
    # the validation loss that chose the head and epoch covers the whole test split, in dataset
    # order, from both ranks' shares: recomputing it on the saved weights gives the same numbers
    exp = config["experiments"]["scan_digits"]
    ctx = RunContext("scan_digits", 0, "scan", exp, work / "digits", work / "scan")
    info = get_info("digits")
    logits, _ = collect(restore(blob, torch.device("cpu")), eval_loader(ctx, info, info.test_split, batch_size=256),
                        torch.device("cpu"), "predict")
    nb = np.load(work / "mine" / "neighbors.npz")["test"][:, : int(exp["scan"].get("num_neighbors_val", 5)) + 1]
    losses = scan_head_losses(torch.softmax(logits, -1), torch.as_tensor(nb))
    assert int(losses["best_head"]) == blob["meta"]["best_head"]
    assert float(losses["total"][blob["meta"]["best_head"]]) == pytest.approx(blob["meta"]["best_val_loss"], rel=1e-4)
    # self-labeling with EMA: killed mid-epoch, resumed on two processes (the EMA state comes back)
    _preempt_and_resume(config, work, "selflabel", at=2)
    _assert_one_artifact(work, "selflabel", [1, 2])


def test_cld_moco_path_skips_a_nan_on_one_rank_on_both(config, work):
    r = _run(config, work, "cld", **{NAN_AT_STEP: "2"})
    _ok(r)
    assert r.stderr.count("step skipped") == 2, r.stderr[-3000:]  # both ranks, the same step
    blob = _assert_one_artifact(work, "cld", [1])
    assert blob["meta"]["nan_steps"] == 1
    assert [e for e, _ in blob["meta"]["knn_history"]] == [1]
    _ok(_run(config, work, "cld_probe"))
    probe = _assert_one_artifact(work, "cld_probe", [1])
    trunk = {k: v for k, v in blob["state_dict"].items() if k.startswith("backbone.")}
    assert trunk and all(torch.equal(probe["state_dict"][k], v) for k, v in trunk.items())  # frozen on both ranks


@pytest.mark.parametrize("stage", ["sela", "superand", "twostage"])
def test_single_process_stages_refuse_two_devices(config, work, stage, capsys):
    assert main([stage, *_args(config, work, stage)]) != 0
    err = capsys.readouterr().err
    assert "runtime.devices=2" in err and "expected 1" in err, err[-2000:]
    assert not (work / stage / "model.ckpt").exists()
