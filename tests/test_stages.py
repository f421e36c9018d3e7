"""Conformance of every stage of the stage table (a new stage is tested by being registered).

Each registered stage, on digits with the embedded default shrunk to two epochs: is stopped by
SIGUSR1 in the middle of its first epoch and resumes, then is killed with SIGKILL right after a
save in the middle of its second epoch and resumes again, ending bit-identical to an uninterrupted
run of the same seed (stages that train with Lightning), or simply runs (the others); then its
evaluation writes rows whose columns and vocabulary are DESIGN.md's metrics table. Plus the table's own invariants, and the rule that a killed stage
resumes only when its own slice of the config is unchanged.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ncd.cli import main
from ncd.config import SCHEMA_DIR, check_stage_config, load_config, schema, stage_backends, stage_config
from ncd.errors import NcdError
from ncd.errors import Preempted
from ncd.methods.common import KILL_AFTER_SAVE, KILL_MID_EPOCH, SIGNAL_MID_EPOCH
from ncd.stages import METHODS, METRICS, METRICS_COLUMNS, SPLITS, STAGES, artifact, evaluated_stages, load

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = {"kmeans": "kmeans_digits", "scan": "scan_digits", "uno": "uno_digits", "sela": "sela_digits",
              "cld": "cld_digits", "twostage": "twostage_digits"}
# the embedded default, two epochs per training stage (one before the kill, one after the resume)
SHRINK = {
    "cluster": {"n_init": 1},
    "pretrain": {"epochs": 2, "batch_size": 256},
    "mine": {"topk": 5, "topk_val": 3},
    "pretext_kmeans": {"n_init": 1},
    "scan": {"epochs": 2, "batch_size": 256, "num_heads": 2},
    "selflabel": {"epochs": 2, "batch_size": 256, "confidence_threshold": 0.5,
                  "ema": {"enabled": True, "alpha": 0.9, "mode": "official"}},  # its shadow weights resume too
    "pretrain_supervised": {"epochs": 2},
    "discover": {"epochs": 2, "num_heads": 2, "hidden_dim": 32, "proj_dim": 16},
    "sela": {"epochs": 2, "nopts": 2, "batch_size": 256, "scheduler": {"name": "constant"},
             "linear_probe": {"epochs": 2, "batch_size": 256, "lr": 0.1, "milestones": [1]}},
    "cld": {"epochs": 2, "batch_size": 128, "knn_every": 1},
    "cld_probe": {"epochs": 2, "batch_size": 128, "lr": 0.1, "milestones": [1]},  # epochs > 0: the stage is on
    "superand": {"rounds": 2, "epochs": 1, "batch_size": 256},
    "twostage": {"epochs": 2, "batch_size": 256, "lr_schedule": {"start": 1, "every": 1}},
}


@pytest.fixture(scope="module")
def config() -> dict:
    cfg = load_config([ROOT / "config.yaml"])
    for stage, over in SHRINK.items():
        exp = cfg["experiments"][EXPERIMENT[STAGES[stage].method]]
        exp[stage] = {**exp.get(stage, {}), **over}
    for exp in cfg["experiments"].values():
        exp["runtime"] = {**exp.get("runtime", {}), "accelerator": "cpu", "threads": 1}
    return cfg


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages")


def _args(config: dict, work: Path, stage: str, out: Path, evaluate: bool = False) -> list[str]:
    exp = EXPERIMENT[STAGES[stage].method]
    slice_file = out.parent / (".eval.json" if evaluate else ".slice.json")
    slice_file.parent.mkdir(parents=True, exist_ok=True)
    slice_file.write_text(json.dumps(stage_config(config, exp, stage, evaluate)))
    args = ["--experiment", exp, "--seed", "0", "--config", f"@{slice_file}", "--data-root", str(work / "digits"),
            "--out", str(out), "--threads", "1"]
    if not evaluate:
        ups = STAGES[stage].inputs_for(config["experiments"][exp])
        for name, up in ups.items():
            args += [f"--{name.replace('_', '-')}", str(work / artifact(up))]
    return args


def _ensure(config: dict, work: Path, stage: str) -> None:
    """Run the upstream stages of ``stage`` that no earlier test ran (a test run on its own)."""
    exp = config["experiments"][EXPERIMENT[STAGES[stage].method]]
    for up in STAGES[stage].inputs_for(exp).values():
        if not (work / artifact(up)).is_file():
            _ensure(config, work, up)
            assert main([up, *_args(config, work, up, work / artifact(up))]) == 0


def _history_epochs(run: Path) -> list[int]:
    with (run / "history.csv").open() as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(f)]


def _run_killed(args: list[str], stage: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ncd", stage, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _evaluate(config: dict, work: Path, stage: str, out: Path) -> list[dict]:
    metrics = out.parent / "metrics.json"
    assert main(["evaluate", *_args(config, work, stage, metrics, evaluate=True), "--ckpt", str(out),
                 "--stage", stage]) == 0
    return json.loads(metrics.read_text())["rows"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    assert sorted(sa) == sorted(sb)
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{len(differ)}/{len(sa)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_runs_resumes_exactly_and_evaluates(stage, config, work):
    """A training stage stopped by SIGUSR1 (SLURM's time-limit warning) at the middle batch of its first
    epoch, rerun, then killed with SIGKILL right after a save at the middle batch of its second epoch and
    rerun again, ends bit-identical to an uninterrupted run of the same seed: every tensor of model.ckpt
    and every metric row."""
    st = STAGES[stage]
    assert st.enabled_for(config["experiments"][EXPERIMENT[st.method]]), "SHRINK must switch the stage on"
    _ensure(config, work, stage)
    out = work / artifact(stage)
    args = _args(config, work, stage, out)
    if st.resumable:
        straight = work / "straight" / artifact(stage)
        assert main([stage, *_args(config, work, stage, straight)]) == 0
        r = _run_killed(args, stage, {SIGNAL_MID_EPOCH: "0"})
        assert r.returncode == Preempted.exit_code, r.stderr[-3000:]
        assert "received SIGUSR1" in r.stderr and (out.parent / "last.ckpt").is_file() and not out.exists()
        r = _run_killed(args, stage, {KILL_MID_EPOCH: "1"})
        assert r.returncode == -9, r.stderr[-3000:]
        assert "resuming stage" in r.stderr
        assert (out.parent / "last.ckpt").is_file() and not out.exists()
        assert _history_epochs(out.parent) == [1]
    log = out.parent / "run.log"
    assert main([stage, *args, "--log", str(log)]) == 0
    assert out.is_file()
    if st.resumable:
        text = log.read_text()
        assert "resuming stage" in text and "not resumable" not in text
        assert _history_epochs(out.parent) == [1, 2]  # the resumed run continued the killed one
        assert not (out.parent / "last.ckpt").exists()
        _assert_same_weights(out, straight)
    if not st.evaluate:
        return
    rows = _evaluate(config, work, stage, out)
    assert rows and any(r["head"] == "best" for r in rows)
    for r in rows:
        assert sorted(r) == sorted(METRICS_COLUMNS), r
        assert (r["method"], r["stage"], r["experiment"], r["dataset"], r["seed"]) == \
            (st.method, stage, EXPERIMENT[st.method], "digits", 0), r
        assert r["split"] in SPLITS and r["metric"] in METRICS, r
        assert r["head"] in ("best", "avg") or r["head"].isdigit(), r
        # ARI and AMI are chance-corrected: a head no better than chance scores slightly below 0
        assert (-1.0 if r["metric"] in ("ari", "ami") else 0.0) <= r["value"] <= 1.0, r
    if st.resumable:
        assert rows == _evaluate(config, work, stage, straight)


# --- the table itself ----------------------------------------------------------------------------

def test_table_is_consistent():
    for st in STAGES.values():
        assert st.method in METHODS
        assert all(up in STAGES and list(STAGES).index(up) < list(STAGES).index(st.name) for up in st.inputs.values())
        assert callable(load(st.run)) and (st.evaluate is None or callable(load(st.evaluate)))
        for block in st.blocks:  # every block a stage reads is documented in the schema
            assert block in schema()["definitions"]["experiment"]["properties"], (st.name, block)
    for m in METHODS:
        assert evaluated_stages(m), m
    assert schema()["definitions"]["experiment"]["properties"]["method"]["enum"] == list(METHODS)
    # every stage with its own block has its own schema file
    assert {f.stem for f in (SCHEMA_DIR / "blocks").glob("*.yaml")} >= {s for s in STAGES if s in SHRINK}


def test_stages_import_without_torch():
    code = "import sys, ncd.stages, ncd.config; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_slices_hold_only_what_a_stage_reads(config):
    full = stage_config(config, "scan_digits", "selflabel")
    assert "selflabel" in full and "scan" not in full and "pretrain" not in full and "seeds" not in full
    assert set(full["upstream"]) == {"scan"}
    assert "mem_mb" not in full["runtime"] and "time_min" not in full["runtime"]
    changed = copy.deepcopy(config)
    changed["experiments"]["scan_digits"]["selflabel"]["epochs"] = 7
    assert stage_config(changed, "scan_digits", "scan") == stage_config(config, "scan_digits", "scan")
    assert stage_config(changed, "scan_digits", "selflabel") != full
    assert stage_config(changed, "scan_digits", "selflabel", evaluate=True)["upstream"] != \
        stage_config(config, "scan_digits", "selflabel", evaluate=True)["upstream"]
    changed["experiments"]["scan_digits"]["pretrain"]["temperature"] = 0.3
    for stage in ("mine", "pretext_kmeans", "scan", "selflabel"):  # upstream change reaches them all
        assert stage_config(changed, "scan_digits", stage)["upstream"] != \
            stage_config(config, "scan_digits", stage)["upstream"]
    assert stage_config(changed, "uno_digits", "discover") == stage_config(config, "uno_digits", "discover")


def test_reading_outside_the_slice_is_an_error(config):
    cfg = check_stage_config("scan_digits", "selflabel", stage_config(config, "scan_digits", "selflabel"))
    assert cfg["selflabel"]["epochs"] == 2
    with pytest.raises(NcdError, match="'scan'.*not in its slice"):
        cfg.get("scan", {})


@pytest.mark.timeout(600)
def test_a_killed_stage_resumes_only_under_its_own_unchanged_slice(config, work, tmp_path):
    """Killed, then rerun after a change elsewhere in the experiment: resumes. Killed, then rerun
    after a change to a key of its own slice: starts afresh."""
    stage = "pretrain_supervised"
    out = tmp_path / stage / "model.ckpt"
    _kill = _run_killed(_args(config, work, stage, out), stage, {KILL_AFTER_SAVE: "1"})
    assert _kill.returncode == -9, _kill.stderr[-3000:]
    elsewhere = copy.deepcopy(config)
    elsewhere["experiments"]["uno_digits"]["discover"]["epochs"] = 5  # another stage's key
    log = tmp_path / "resume.log"
    assert main([stage, *_args(elsewhere, work, stage, out), "--log", str(log)]) == 0
    assert "resuming stage" in log.read_text() and _history_epochs(out.parent) == [1, 2]

    out.unlink()
    _kill = _run_killed(_args(config, work, stage, out), stage, {KILL_AFTER_SAVE: "1"})
    assert _kill.returncode == -9, _kill.stderr[-3000:]
    own = copy.deepcopy(config)
    own["experiments"]["uno_digits"]["pretrain_supervised"]["batch_size"] = 64  # its own key
    log = tmp_path / "fresh.log"
    assert main([stage, *_args(own, work, stage, out), "--log", str(log)]) == 0
    text = log.read_text()
    assert "written under another configuration" in text and "resuming stage" not in text
    assert _history_epochs(out.parent) == [1, 2]


BATCHED_STAGES = ["pretrain", "scan", "selflabel", "pretrain_supervised", "discover", "sela", "cld", "superand",
                  "twostage"]


@pytest.mark.parametrize("stage", BATCHED_STAGES)
def test_the_other_augmentation_backend_resumes_exactly(config, work, tmp_path, stage):
    """Every stage with a batched path, under the ``augment.backend`` its embedded-default experiment
    does not use (the conformance test above covers the one it uses): the SimCLR pretext, SCAN (strong
    views of anchors and neighbours), self-labeling (weak and strong views), UNO's pretraining and
    discovery (large and small crops), SeLa (training view and label pass), NPID + CLD, Super-AND and
    stage 2 (two views each), killed with SIGKILL after a mid-epoch save and rerun, end bit-identical to
    an uninterrupted run: a batched view is a function of seed, epoch and index, a PIL one is drawn
    from generators seeded from them."""
    _ensure(config, work, stage)
    exp = EXPERIMENT[STAGES[stage].method]
    default = stage_backends(config["experiments"][exp])[stage]
    other = "pil" if default == "batched" else "batched"
    cfg = copy.deepcopy(config)
    cfg["experiments"][exp]["augment"] = {"backend": other}
    straight = tmp_path / "straight" / "model.ckpt"
    log = tmp_path / "straight.log"
    assert main([stage, *_args(cfg, work, stage, straight), "--log", str(log)]) == 0
    assert re.search(rf"{other}( strong)? augmentation", log.read_text())
    out = tmp_path / "killed" / "model.ckpt"
    r = _run_killed(_args(cfg, work, stage, out), stage, {KILL_MID_EPOCH: "1"})
    assert r.returncode == -9, r.stderr[-3000:]
    assert (out.parent / "last.ckpt").is_file() and not out.exists()
    log = tmp_path / "resumed.log"
    assert main([stage, *_args(cfg, work, stage, out), "--log", str(log)]) == 0
    assert "resuming stage" in log.read_text() and _history_epochs(out.parent) == [1, 2]
    _assert_same_weights(out, straight)


@pytest.mark.parametrize("stage", ["pretrain", "discover"])
def test_a_channels_last_run_resumes_exactly(config, work, tmp_path, stage):
    """``runtime.channels_last``: the weights and the optimiser's momentum are channels-last tensors, and
    a run killed with SIGKILL after a mid-epoch save and rerun still ends bit-identical to an
    uninterrupted channels-last run (SimCLR's pretext with SGD, UNO's discovery with its heads)."""
    _ensure(config, work, stage)
    exp = EXPERIMENT[STAGES[stage].method]
    cfg = copy.deepcopy(config)
    cfg["experiments"][exp]["runtime"]["channels_last"] = True
    straight = tmp_path / "straight" / "model.ckpt"
    assert main([stage, *_args(cfg, work, stage, straight)]) == 0
    out = tmp_path / "killed" / "model.ckpt"
    r = _run_killed(_args(cfg, work, stage, out), stage, {KILL_MID_EPOCH: "1"})
    assert r.returncode == -9, r.stderr[-3000:]
    last = torch.load(out.parent / "last.ckpt", map_location="cpu", weights_only=True)
    conv = [v for v in last["state_dict"].values() if v.dim() == 4]
    moments = [b for st in last["optimizer_states"][0]["state"].values() for b in st.values()
               if torch.is_tensor(b) and b.dim() == 4]
    assert conv and len(moments) == len(conv)
    # (with one input channel, as digits' first convolution, both layouts are the same strides)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in conv + moments)
    assert all(not v.is_contiguous() for v in conv + moments if v.shape[1] > 1)
    log = tmp_path / "resumed.log"
    assert main([stage, *_args(cfg, work, stage, out), "--log", str(log)]) == 0
    assert "resuming stage" in log.read_text() and _history_epochs(out.parent) == [1, 2]
    _assert_same_weights(out, straight)
