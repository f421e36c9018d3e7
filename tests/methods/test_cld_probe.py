"""CLD's linear probe as its own stage (cld_probe) on scikit-learn's digits: a tiny CLD, then the
probe on its frozen trunk (checkpoint, evaluation, resume after a crash, its own precision), and
the stage table and config slices that turn it on and keep it apart from CLD's training."""

from __future__ import annotations

import copy
import csv
import logging
import math
from pathlib import Path

import pytest
import torch

from ncd.checkpoint import load_model, sub_state
from ncd.config import (
    StageConfig,
    check_stage_config,
    load_config,
    resolve_experiment,
    stage_config,
)
from ncd.errors import NcdError
from ncd.eval.rows import selected_on_test
from ncd.methods import cld_probe
from ncd.methods.cld import run_cld
from ncd.methods.cld_probe import KIND, LinearProbeModule, ProbeModel, run_cld_probe
from ncd.methods.common import RunContext, restore
from ncd.methods.evaluate import evaluate
from ncd.stages import STAGES, evaluated_stages, stages_of

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
PROBE = {"epochs": 2, "batch_size": 256, "lr": 0.1, "milestones": [1], "gamma": 0.1}


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config([ROOT / "config.yaml"])


def _cfg(config: dict) -> dict:
    cfg = resolve_experiment(config, "cld_digits")
    cfg["backbone_kwargs"] = {"width": 4, "pool": 1}
    cfg["runtime"].update(accelerator="cpu", devices=1, num_workers=0, precision="32-true")
    cfg["cld"].update(epochs=1, batch_size=256, knn_every=0, low_dim=16)
    cfg["cld_probe"].update(PROBE)
    return cfg


def _ctx(run: Path, cfg: dict, stage: str) -> RunContext:
    out = run / stage
    out.mkdir(parents=True, exist_ok=True)
    return RunContext("cld_digits", 0, stage, cfg, run / "data", out)


@pytest.fixture(scope="module")
def trunk(tmp_path_factory, config) -> Path:
    """A tiny CLD (one epoch) whose backbone every test probes."""
    run = tmp_path_factory.mktemp("cld_probe")
    ctx = _ctx(run, _cfg(config), "cld")
    torch.manual_seed(0)
    run_cld(ctx, ctx.out_dir / "model.ckpt")
    return ctx.out_dir / "model.ckpt"


def _history(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))


def test_probe_trains_on_the_frozen_trunk_and_evaluates(tmp_path, config, trunk):
    ctx = _ctx(tmp_path, _cfg(config), "cld_probe")
    out = ctx.out_dir / "model.ckpt"
    run_cld_probe(ctx, trunk, out)
    assert out.is_file() and not (ctx.out_dir / "last.ckpt").exists()
    blob = load_model(out, expected={"kind": KIND, "num_classes": 10})
    cld = load_model(trunk)
    assert blob["arch"]["trunk"] == cld["arch"] and blob["arch"]["backbone_dim"] == cld["arch"]["backbone_dim"]
    model = restore(blob, torch.device("cpu"))
    assert isinstance(model, ProbeModel) and model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # the trunk is bit for bit the CLD backbone, BatchNorm statistics included
    got, want = sub_state(blob["state_dict"], "backbone"), sub_state(cld["state_dict"], "backbone")
    assert got.keys() == want.keys() and any("running_mean" in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    hist = _history(ctx.out_dir)
    assert [int(r["epoch"]) for r in hist] == [1, 2]
    # history reads the lr after the epoch's scheduler step: epoch 1 at 0.1, then x gamma from milestone 1 on
    assert [float(r["lr"]) for r in hist] == pytest.approx([0.01, 0.01])
    rows = evaluate(ctx, out, ctx.out_dir / "metrics.json")
    assert [(r["stage"], r["split"], r["head"], r["metric"]) for r in rows] == \
        [("cld_probe", "test", "best", "linear_top1"), ("cld_probe", "test", "best", selected_on_test("linear_top1"))]
    assert 0.0 <= rows[0]["value"] <= 1.0
    # main_lincls.py validates after every epoch and reports the best: the last epoch's validation is the
    # final model's top-1, and the selected value is the best of the epochs' validations
    val = [float(r["val_top1"]) for r in hist]
    best = blob["meta"]["probe_val"]
    assert rows[1]["value"] == best["best_top1"] == pytest.approx(max(val)) and best["best_epoch"] == val.index(max(val)) + 1
    assert rows[0]["value"] == pytest.approx(val[-1], abs=1e-6)


def test_a_crashed_probe_resumes_from_its_last_epoch(tmp_path, config, trunk, monkeypatch, caplog):
    ctx = _ctx(tmp_path, _cfg(config), "cld_probe")
    out = ctx.out_dir / "model.ckpt"

    def crash(self) -> None:  # after epoch 1's last.ckpt is written
        raise RuntimeError("killed")

    monkeypatch.setattr(LinearProbeModule, "on_train_epoch_end", crash, raising=False)
    with pytest.raises(RuntimeError, match="killed"):
        run_cld_probe(ctx, trunk, out)
    saved = torch.load(ctx.out_dir / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0 and not out.exists()
    # epoch 1's validation ran before its last.ckpt was written: the best so far travels in it
    assert int(saved["state_dict"]["best_epoch"]) == 0 and float(saved["state_dict"]["best_top1"]) >= 0
    monkeypatch.undo()
    restored = {}

    def on_train_start(self) -> None:
        restored.update(fc=self.model.fc.weight.detach().clone(), lr=self.trainer.optimizers[0].param_groups[0]["lr"],
                        trunk_eval=not any(m.training for m in self.model.backbone.modules()))

    monkeypatch.setattr(LinearProbeModule, "on_train_start", on_train_start, raising=False)
    with caplog.at_level(logging.INFO, logger="ncd"):
        run_cld_probe(ctx, trunk, out)
    assert "resuming stage cld_probe" in caplog.text
    torch.testing.assert_close(restored["fc"], saved["state_dict"]["model.fc.weight"])
    assert restored["lr"] == pytest.approx(0.01) and restored["trunk_eval"]  # the schedule resumed too
    assert [int(r["epoch"]) for r in _history(ctx.out_dir)] == [1, 2]  # the resumed run continued the crashed one
    assert out.is_file() and not (ctx.out_dir / "last.ckpt").exists()
    # the best is over both epochs, the one before the crash included
    val = [float(r["val_top1"]) for r in _history(ctx.out_dir)]
    assert val[0] == pytest.approx(float(saved["state_dict"]["best_top1"]))
    best = load_model(out)["meta"]["probe_val"]
    assert best["best_top1"] == pytest.approx(max(val)) and best["best_epoch"] == val.index(max(val)) + 1


def test_the_probe_trains_in_its_own_precision(tmp_path, config, trunk, monkeypatch):
    cfg = _cfg(config)
    cfg["cld_probe"].update(precision="bf16-mixed", validate=False)  # the per-epoch validation is tested above
    # the slice the command line gives the stage: reading a key outside it (e.g. `cld`) is an error
    whole = {**config, "experiments": {**config["experiments"], "cld_digits": cfg}}
    sliced = check_stage_config("cld_digits", "cld_probe", stage_config(whole, "cld_digits", "cld_probe"))
    ctx = _ctx(tmp_path, sliced, "cld_probe")
    seen = {}
    real_fit = cld_probe.fit

    def spy(*args, **kwargs):
        trainer = real_fit(*args, **kwargs)
        seen.update(precision=trainer.precision, epochs=trainer.current_epoch)
        return trainer

    monkeypatch.setattr(cld_probe, "fit", spy)
    run_cld_probe(ctx, trunk, ctx.out_dir / "model.ckpt")
    assert seen == {"precision": "bf16-mixed", "epochs": 2}  # the trainer ran in the block's precision
    assert type(ctx.cfg) is StageConfig and ctx.runtime["precision"] == "32-true"  # the run's own is untouched
    assert load_model(ctx.out_dir / "model.ckpt")["meta"]["precision"] == "bf16-mixed"


def test_batch_size_is_split_over_the_devices(tmp_path, config, trunk):
    cfg = _cfg(config)
    cfg["runtime"]["devices"] = 3
    ctx = _ctx(tmp_path, cfg, "cld_probe")
    with pytest.raises(NcdError, match="cld_probe.batch_size 256 .* multiple of runtime.devices"):
        run_cld_probe(ctx, trunk, ctx.out_dir / "model.ckpt")
    cfg["cld_probe"]["epochs"] = 0
    with pytest.raises(NcdError, match="cld_probe.epochs is 0"):
        run_cld_probe(ctx, trunk, ctx.out_dir / "model.ckpt")


def test_the_stage_runs_only_when_its_epochs_are_set(config):
    exp = copy.deepcopy(config["experiments"]["cld_digits"])
    assert exp["cld_probe"]["epochs"] == 0 and not STAGES["cld_probe"].enabled_for(exp)
    assert evaluated_stages("cld", exp) == ["cld"]
    assert [s.name for s in stages_of("cld", exp)] == ["cld"]
    assert evaluated_stages("cld") == ["cld", "cld_probe"]  # without a config: the whole table
    exp["cld_probe"]["epochs"] = 3
    assert evaluated_stages("cld", exp) == ["cld", "cld_probe"]
    assert evaluated_stages("scan", exp) == evaluated_stages("scan")  # stages without a switch are always on
    paper = load_config([ROOT / "config.yaml", ROOT / "workflow/experiments/paper.yaml"])
    probed = sorted(n for n, e in paper["experiments"].items() if "cld_probe" in evaluated_stages(e["method"], e))
    assert probed == ["cld_imagenet_infomin", "cld_imagenet_mocov2", "infomin_imagenet", "mocov2_imagenet",
                      "mocov2_imagenet_original"]


def test_changing_the_probe_does_not_rerun_cld(config):
    changed = copy.deepcopy(config)
    changed["experiments"]["cld_digits"]["cld_probe"].update(epochs=5, lr=1.0)
    assert stage_config(changed, "cld_digits", "cld") == stage_config(config, "cld_digits", "cld")
    assert stage_config(changed, "cld_digits", "cld_probe") != stage_config(config, "cld_digits", "cld_probe")
    probe = stage_config(config, "cld_digits", "cld_probe")
    assert "cld" not in probe and set(probe["upstream"]) == {"cld"}
    changed["experiments"]["cld_digits"]["cld"]["lambda"] = 0.5  # a new trunk reruns the probe
    assert stage_config(changed, "cld_digits", "cld_probe")["upstream"] != probe["upstream"]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("init", ["moco", "default"])
def test_the_classifier_init(tmp_path, config, trunk, monkeypatch, init):
    """MoCo's main_lincls.py: N(0, 0.01) weights, zero bias; InfoMin's probe (PyContrast build_linear.py):
    nn.Linear's own init, uniform in +-1/sqrt(fan_in) for weights and bias."""
    cfg = _cfg(config)
    cfg["cld_probe"]["init"] = init
    ctx = _ctx(tmp_path, cfg, "cld_probe")
    seen = {}

    def spy(module, *args, **kwargs):
        seen.update(w=module.model.fc.weight.detach().clone(), b=module.model.fc.bias.detach().clone())
        raise _Stop

    monkeypatch.setattr(cld_probe, "fit", spy)
    with pytest.raises(_Stop):
        run_cld_probe(ctx, trunk, ctx.out_dir / "model.ckpt")
    w, b = seen["w"], seen["b"]
    bound = 1 / math.sqrt(w.shape[1])
    if init == "moco":
        assert torch.count_nonzero(b) == 0 and float(w.std()) == pytest.approx(0.01, rel=0.35)
    else:
        assert torch.count_nonzero(b) == b.numel() and float(b.abs().max()) <= bound
        assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.35)
    ctx.cfg["cld_probe"]["init"] = "xavier"
    with pytest.raises(NcdError, match="cld_probe.init 'xavier'"):
        run_cld_probe(ctx, trunk, ctx.out_dir / "model.ckpt")


def test_without_validation_only_the_final_top1_is_reported(tmp_path, config, trunk):
    cfg = _cfg(config)
    cfg["cld_probe"].update(epochs=1, validate=False)
    ctx = _ctx(tmp_path, cfg, "cld_probe")
    run_cld_probe(ctx, trunk, ctx.out_dir / "model.ckpt")
    assert "probe_val" not in load_model(ctx.out_dir / "model.ckpt")["meta"]
    assert "val_top1" not in _history(ctx.out_dir)[0]
    rows = evaluate(ctx, ctx.out_dir / "model.ckpt", ctx.out_dir / "metrics.json")
    assert [r["metric"] for r in rows] == ["linear_top1"]
