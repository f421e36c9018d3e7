"""benchmarks/resume_check.py: a stage stopped from outside at a random moment, then rerun, ends identical."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("resume_check", ROOT / "benchmarks" / "resume_check.py")
rc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rc)


def test_every_resumable_stage_is_shrunk():
    """A stage added to the table without an entry here would run at its full length."""
    for name, st in rc.STAGES.items():
        if st.resumable:
            assert name in rc.SHRINK, name
    cfg = rc.shrunk_config()
    assert all(e["runtime"]["checkpoint_every_n_steps"] == 1 for e in cfg["experiments"].values())


def test_same_weights_names_what_differs(tmp_path):
    sd = {"a": torch.zeros(3), "b": torch.ones(2)}
    torch.save({"state_dict": sd}, tmp_path / "x.ckpt")
    torch.save({"state_dict": {**sd, "b": torch.tensor([1.0, 1.0 + 2**-20])}}, tmp_path / "y.ckpt")
    torch.save({"state_dict": {"a": sd["a"]}}, tmp_path / "z.ckpt")
    assert rc.same_weights(tmp_path / "x.ckpt", tmp_path / "x.ckpt") == (True, "2/2 tensors equal")
    assert rc.same_weights(tmp_path / "x.ckpt", tmp_path / "y.ckpt") == (False, "1/2 tensors equal")
    assert rc.same_weights(tmp_path / "x.ckpt", tmp_path / "z.ckpt")[0] is False


@pytest.mark.timeout(600)
def test_a_stage_stopped_at_a_random_moment_resumes_identical(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "resume_check.py"), "--stages", "pretrain_supervised",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=580, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("pretrain_supervised")]
    assert [line.split()[1] for line in lines] == ["KILL", "USR1"], r.stdout
    # 3 epochs of the 5 known digits at batch 128 with drop_last: 4 batches an epoch, 12 steps; a stop
    # lands after the first save
    for line in lines:
        m = re.search(r"epoch (\d+), after batch (\d+) \(step (\d+)\)\s+identical \(25/25 tensors equal\)", line)
        assert m, line
        epoch, batch, step = map(int, m.groups())
        assert 1 <= epoch <= 3 and 1 <= batch <= 4 and step == 4 * (epoch - 1) + batch and step <= 12, line
    assert r.stdout.rstrip().endswith("resume_check: every stopped run ended identical")
    # the stopped runs left their rerun's artifact, resumed from the last.ckpt the stop left
    for sig in ("kill0", "usr10"):
        assert (tmp_path / sig / "pretrain_supervised" / "model.ckpt").is_file()
        assert not (tmp_path / sig / "pretrain_supervised" / "last.ckpt").exists()


def test_unknown_stage_is_refused(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "resume_check.py"), "--stages", "nosuch",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "nosuch" in r.stderr and "pretrain" in r.stderr
