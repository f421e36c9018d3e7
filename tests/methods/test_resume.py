"""A training stage killed mid-run resumes from its last complete epoch."""

from __future__ import annotations

import csv
import os
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ncd.config import load_config, resolve_experiment

ROOT = Path(__file__).resolve().parents[2]


def _load_last(path: Path) -> dict:
    """last.ckpt as resume reads it: without unpickling code (NumPy scalars are the only extra types)."""
    from ncd.methods.common import RESUME_SAFE_GLOBALS

    with torch.serialization.safe_globals(RESUME_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def _cmd(tmp: Path, cfg: dict) -> list[str]:
    return [sys.executable, "-m", "ncd", "pretrain", "--experiment", "scan_digits", "--seed", "0",
            "--config", json.dumps(cfg), "--data-root", str(tmp / "digits"),
            "--out", str(tmp / "run/pretrain/model.ckpt"), "--log", str(tmp / "pretrain.log"), "--threads", "1"]


def _cfg(epochs: int) -> dict:
    cfg = resolve_experiment(load_config([ROOT / "config.yaml"]), "scan_digits")
    cfg["backbone_kwargs"] = {"width": 8, "pool": 2}
    cfg["pretrain"].update(epochs=epochs, batch_size=256)
    return cfg


@pytest.mark.timeout(300)
def test_killed_pretrain_resumes_from_last_checkpoint(tmp_path):
    cfg = _cfg(12)
    last = tmp_path / "run/pretrain/last.ckpt"
    proc = subprocess.Popen(_cmd(tmp_path, cfg), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    epoch = 0
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            try:
                epoch = _load_last(last)["epoch"]
            except Exception:  # noqa: BLE001 - a reader may race the rename; try again
                pass
            if epoch >= 3:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert epoch >= 3
    assert not (tmp_path / "run/pretrain/model.ckpt").exists()  # no output from a killed run
    assert not list((tmp_path / "run/pretrain").glob(".*.tmp"))  # and no torn temp file under a final name

    r = subprocess.run(_cmd(tmp_path, cfg), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "pretrain.log").read_text()
    assert "resuming stage pretrain" in log
    assert "epoch 1/12 " not in log  # the finished epochs were not trained again
    rows = list(csv.DictReader((tmp_path / "run/pretrain/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))  # one continuous curve
    blob = torch.load(tmp_path / "run/pretrain/model.ckpt", weights_only=True)
    assert blob["arch"]["kind"] == "contrastive"
    assert not last.exists()


@pytest.mark.timeout(300)
def test_last_checkpoint_of_another_config_is_not_resumed(tmp_path):
    out = tmp_path / "run/pretrain"
    out.mkdir(parents=True)
    (out / "last.ckpt").write_bytes(b"stale")
    (out / "last.ckpt.config").write_text("0123456789ab\n")
    r = subprocess.run(_cmd(tmp_path, _cfg(1)), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "written under another configuration" in (tmp_path / "pretrain.log").read_text()
    assert (out / "model.ckpt").is_file()


@pytest.mark.timeout(300)
# SIGUSR1 mid-epoch, per stage and compared with an uninterrupted run: tests/test_stages.py
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_time_limit_signal_saves_mid_epoch_and_the_retry_resumes(tmp_path, sig):
    """SIGTERM (preemption, scancel; SLURM's ``--signal=USR1@s`` likewise): save last.ckpt after the
    current batch, exit 75."""
    cfg = _cfg(8)
    cfg["pretrain"]["batch_size"] = 64  # several batches per epoch, so the signal lands mid-epoch
    last = tmp_path / "run/pretrain/last.ckpt"
    proc = subprocess.Popen(_cmd(tmp_path, cfg), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-2000:]
    assert f"stopped by {sig.name}" in err
    blob = _load_last(last)
    batches = blob["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    assert 0 < batches < 20  # 1257 images / 64 = 20 batches: saved inside an epoch, not at its end
    assert not (tmp_path / "run/pretrain/model.ckpt").exists()

    r = subprocess.run(_cmd(tmp_path, cfg), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming stage pretrain" in (tmp_path / "pretrain.log").read_text()
    rows = list(csv.DictReader((tmp_path / "run/pretrain/history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert (tmp_path / "run/pretrain/model.ckpt").is_file()


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.timeout(300)
def test_resume_with_workers_is_exact_and_workers_do_not_change_the_run(tmp_path):
    """Order and augmentation are functions of (seed, epoch, index), not of which process loads a sample:
    a run with 2 DataLoader workers killed mid-epoch and resumed ends bit-identical to an uninterrupted
    run without workers (and so to one with them)."""
    from ncd.methods.common import KILL_MID_EPOCH

    cfg = _cfg(2)
    straight = tmp_path / "straight"
    r = subprocess.run(_cmd(straight, cfg), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg["runtime"] = {**cfg["runtime"], "num_workers": 2}
    killed = tmp_path / "killed"
    r = subprocess.run(_cmd(killed, cfg), cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**os.environ, KILL_MID_EPOCH: "1"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert (killed / "run/pretrain/last.ckpt").is_file()
    r = subprocess.run(_cmd(killed, cfg), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _state(straight / "run/pretrain/model.ckpt"), _state(killed / "run/pretrain/model.ckpt")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


class _RunsCode:
    """Unpickling this touches a file: the proof a checkpoint ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.timeout(300)
def test_a_crafted_last_checkpoint_runs_no_code(tmp_path):
    """A last.ckpt that is a pickle with code, next to a matching config sidecar (computable from the public
    config), is not unpickled: it is moved aside with a warning and the stage starts afresh."""
    from ncd.config import check_stage_config
    from ncd.utils import config_hash

    cfg = _cfg(1)
    out = tmp_path / "run/pretrain"
    out.mkdir(parents=True)
    proof = tmp_path / "pwned"
    torch.save({"state_dict": {}, "loops": {}, "payload": _RunsCode(str(proof))}, out / "last.ckpt")
    (out / "last.ckpt.config").write_text(config_hash(check_stage_config("scan_digits", "pretrain", cfg)) + "\n")
    r = subprocess.run(_cmd(tmp_path, cfg), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not proof.exists(), "loading last.ckpt ran code"
    log = (tmp_path / "pretrain.log").read_text()
    assert "cannot resume from" in log and "resuming stage" not in log
    assert (out / "last.ckpt.unreadable").is_file() and (out / "model.ckpt").is_file()


@pytest.mark.timeout(300)
def test_a_torn_last_checkpoint_starts_afresh_instead_of_failing_every_rerun(tmp_path):
    cfg = _cfg(1)
    out = tmp_path / "run/pretrain"
    out.mkdir(parents=True)
    (out / "last.ckpt").write_bytes(b"PK\x03\x04 torn by a full disk")
    from ncd.config import check_stage_config
    from ncd.utils import config_hash
    (out / "last.ckpt.config").write_text(config_hash(check_stage_config("scan_digits", "pretrain", cfg)) + "\n")
    r = subprocess.run(_cmd(tmp_path, cfg), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cannot resume from" in (tmp_path / "pretrain.log").read_text()
    assert (out / "model.ckpt").is_file()
