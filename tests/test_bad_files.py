"""Bad files and a hostile file system: each ends `python -m ncd` with one clear line and exit 2, and
leaves nothing partial behind (truncated artifacts, a read-only or full disk, two runs in one folder)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ncd.checkpoint import load_model, save_model
from ncd.cli import main
from ncd.config import load_config, stage_config
from ncd.errors import LockedError, NcdError, WriteError
from ncd.methods.neighbors import load_neighbors, save_neighbors
from ncd.utils import LOCK_NAME, run_lock, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config([ROOT / "config.yaml"])


def stage_args(config: dict, tmp: Path, stage: str, exp: str, out: Path, **inputs: Path) -> list[str]:
    """``python -m ncd <stage>`` arguments with the embedded default's slice for ``exp``."""
    slice_file = tmp / f"{stage}.json"
    slice_file.write_text(json.dumps(stage_config(config, exp, stage)))
    args = [stage, "--experiment", exp, "--seed", "0", "--config", f"@{slice_file}", "--data-root",
            str(tmp / "digits"), "--out", str(out)]
    for name, path in inputs.items():
        args += [f"--{name}", str(path)]
    return args


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def a_model(path: Path) -> Path:
    save_model(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"kind": "contrastive", "backbone": "small_cnn"})
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# --- neighbors.npz ------------------------------------------------------------------------------

def test_neighbors_round_trip_and_checks(tmp_path):
    nb = {"train": np.array([[0, 1], [1, 0], [2, 1]]), "test": np.array([[0, 1], [1, 0]])}
    save_neighbors(tmp_path / "neighbors.npz", nb)
    back = load_neighbors(tmp_path / "neighbors.npz", sizes={"train": 3, "test": 2})
    np.testing.assert_array_equal(back["train"], nb["train"])
    with pytest.raises(NcdError, match=r"'train' has 3 rows .* expected 4 rows"):
        load_neighbors(tmp_path / "neighbors.npz", sizes={"train": 4})
    save_neighbors(tmp_path / "only.npz", {"train": nb["train"]})
    with pytest.raises(NcdError, match=r"only.npz has no test array"):
        load_neighbors(tmp_path / "only.npz")
    save_neighbors(tmp_path / "float.npz", {"train": nb["train"] * 0.5, "test": nb["test"]})
    with pytest.raises(NcdError, match="expected integer indices"):
        load_neighbors(tmp_path / "float.npz")


def test_truncated_neighbors_is_one_line_naming_the_file(tmp_path, config, capsys):
    nb = tmp_path / "neighbors.npz"
    save_neighbors(nb, {"train": np.zeros((50, 3), int), "test": np.zeros((20, 2), int)})
    truncate(nb)
    with pytest.raises(NcdError, match=rf"neighbours file {nb} is truncated or not an npz file .*rerun the mine stage"):
        load_neighbors(nb)
    out = tmp_path / "scan" / "model.ckpt"
    args = stage_args(config, tmp_path, "scan", "scan_digits", out, pretrain=a_model(tmp_path / "pre.ckpt"), neighbors=nb)
    assert main(args) == 2
    assert f"neighbours file {nb} is truncated" in one_line_error(capsys)
    assert not out.exists() and not (out.parent / LOCK_NAME).exists()


# --- model.ckpt ---------------------------------------------------------------------------------

def test_truncated_upstream_checkpoint_is_one_line(tmp_path, config, capsys):
    bad = truncate(a_model(tmp_path / "scan.ckpt"))
    with pytest.raises(NcdError, match=rf"checkpoint {bad} is truncated, corrupt or not an ncd model"):
        load_model(bad)
    out = tmp_path / "selflabel" / "model.ckpt"
    assert main(stage_args(config, tmp_path, "selflabel", "scan_digits", out, scan=bad)) == 2
    line = one_line_error(capsys)
    assert f"checkpoint {bad} is truncated" in line and "rerun the stage that writes it" in line
    assert not out.exists()


# --- a read-only folder, a full disk --------------------------------------------------------------

def _no_temp_files(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_full_disk_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real_write = Path.write_text

    def half_then_full(self, text, *a, **k):
        real_write(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    target = tmp_path / "out" / "metrics.json"
    with pytest.raises(WriteError, match=rf"cannot write {target}: No space left on device .*free some space") as e:
        write_text_atomic(target, "x" * 1000)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []


def test_full_disk_in_torch_save_leaves_nothing(tmp_path, monkeypatch):
    def fail(obj, f, *a, **k):
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(WriteError, match=r"cannot write checkpoint .*model.ckpt: .*disk full"):
        a_model(tmp_path / "model.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("ncd.utils.os.replace", full)
    root = tmp_path / "digits"
    assert main(["prepare", "--dataset", "digits", "--root", str(root), "--no-download"]) == 2
    line = one_line_error(capsys)
    # the first file prepare writes for digits is its split cache, then READY
    assert f"cannot write {root / 'digits.npz'}: No space left on device" in line
    assert list(root.iterdir()) == []


def test_read_only_results_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """EROFS (a read-only mount) is simulated, as is EACCES for root, whom chmod does not stop."""
    root = tmp_path / "digits"
    root.mkdir()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(root))

    with monkeypatch.context() as m:
        m.setattr("ncd.utils.tempfile.mkstemp", read_only)
        assert main(["prepare", "--dataset", "digits", "--root", str(root), "--no-download"]) == 2
    line = one_line_error(capsys)
    assert f"cannot write {root / 'digits.npz'}: Read-only file system" in line and "choose a writable results_dir" in line
    root.chmod(0o555)
    try:
        if os.geteuid() != 0:  # a real read-only folder where permissions apply
            assert main(["prepare", "--dataset", "digits", "--root", str(root), "--no-download"]) == 2
            assert f"cannot write {root / 'digits.npz'}: Permission denied" in one_line_error(capsys)
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o755)


def test_unrelated_os_errors_still_raise(tmp_path, monkeypatch):
    """Only file-system failures become one line; a missing file is a bug or bad input with its own message."""
    def broken(*a, **k):
        raise OSError(errno.ENOEXEC, "exec format error")

    monkeypatch.setattr("ncd.data.prepare_dataset", broken)
    with pytest.raises(OSError, match="exec format error"):
        main(["prepare", "--dataset", "digits", "--root", str(tmp_path)])


# --- two runs in one folder -----------------------------------------------------------------------

HOLD = """
import sys, time
from ncd.utils import run_lock
with run_lock(sys.argv[1], "the test's holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_run_in_one_folder_is_refused_and_a_killed_holder_releases(tmp_path, config, capsys):
    folder = tmp_path / "run" / "pretrain"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = stage_args(config, tmp_path, "pretrain", "scan_digits", folder / "model.ckpt")
        t = time.monotonic()
        assert main(args) == 2
        assert time.monotonic() - t < 10  # refused at once, not after loading data or training
        line = one_line_error(capsys)
        assert f"already running in {folder}" in line and f"pid {holder.pid}" in line
        with pytest.raises(LockedError):
            with run_lock(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_NAME).exists()  # SIGKILL leaves the file, but not the lock
    with run_lock(folder) as lock:
        assert f"pid {os.getpid()}" in lock.read_text()
    assert not (folder / LOCK_NAME).exists()


def test_lock_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        with run_lock(tmp_path):
            raise RuntimeError("crash")
    with run_lock(tmp_path):
        pass
