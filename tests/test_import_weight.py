"""Jobs that train nothing start light: an evaluate job imports ``ncd.methods.evaluate`` and the evaluated
stage's evaluator module and with them no Lightning, faiss or matplotlib; the stages that train nothing
(k-means, mining, pretext k-means) import no Lightning either, and aggregation needs neither torch nor
SciPy. Each check imports in a fresh interpreter (benchmarks/startup.py times the same imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ncd.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "faiss", "pytorch_lightning", "matplotlib")

EVALUATOR_MODULES = sorted({s.evaluate.partition(":")[0] for s in STAGES.values() if s.evaluate})
# the stages that fit without Lightning (no last.ckpt to resume from): their runners must not import it
LIGHT_RUNNERS = sorted({s.run.partition(":")[0] for s in STAGES.values() if not s.resumable})


def _imported(modules: list[str], watch: tuple[str, ...]) -> list[str]:
    """The modules of ``watch`` that importing ``modules`` in a fresh interpreter brought in."""
    code = ("; ".join(f"import {m}" for m in modules)
            + f"; import json, sys; print(json.dumps(sorted(m for m in {watch!r} if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_evaluator_lives_in_a_module_without_lightning():
    assert EVALUATOR_MODULES and "ncd.methods.scan_eval" in EVALUATOR_MODULES
    assert _imported(["ncd.methods.evaluate", *EVALUATOR_MODULES], HEAVY) == []


@pytest.mark.parametrize("stage", ["scan", "discover", "sela", "twostage"])
def test_an_evaluate_job_of_one_stage_imports_no_lightning(stage):
    """What ``python -m ncd evaluate --stage <stage>`` imports before its evaluator runs."""
    assert _imported(["ncd.cli", "ncd.config", "ncd.methods.evaluate", STAGES[stage].evaluate.partition(":")[0]],
                     HEAVY) == []


def test_no_evaluator_imports_torchvision():
    """torchvision's import (> 1 s: torchvision.ops brings torch._dynamo) is left to the jobs that read files
    or augment: an evaluator uses the torchvision-free evaluation transform."""
    assert _imported(["ncd.cli", "ncd.config", "ncd.methods.evaluate", *EVALUATOR_MODULES], ("torchvision",)) == []


def test_a_real_evaluate_job_on_digits_imports_no_torchvision_lightning_or_faiss(tmp_path):
    """The workflow's evaluate command, run to its end on digits (prepared: from the split cache), for an
    untrained SCAN model: it writes its metrics and never imported torchvision, Lightning or faiss."""
    import torch

    from ncd.checkpoint import save_model
    from ncd.config import load_config, resolve_experiment, stage_config
    from ncd.data import prepare_dataset
    from ncd.models import model_from_arch

    config = load_config([ROOT / "config.yaml"])
    exp = resolve_experiment(config, "scan_digits")
    arch = {"kind": "clustering", "backbone": exp["backbone"], "in_channels": 1,
            "backbone_kwargs": dict(exp.get("backbone_kwargs", {})), "num_clusters": 10, "num_heads": 2}
    torch.manual_seed(0)
    ckpt, out = tmp_path / "model.ckpt", tmp_path / "metrics.json"
    save_model(ckpt, model_from_arch(arch).state_dict(), arch, {"best_head": 1})
    prepare_dataset("digits", tmp_path / "digits")
    cfg = json.dumps(stage_config(config, "scan_digits", "scan", evaluate=True))
    code = ("import json, sys; from ncd.cli import main; "
            f"rc = main(['evaluate', '--experiment', 'scan_digits', '--seed', '0', '--config', {cfg!r}, "
            f"'--data-root', {str(tmp_path / 'digits')!r}, '--ckpt', {str(ckpt)!r}, '--stage', 'scan', "
            f"'--out', {str(out)!r}]); "
            f"print(json.dumps([rc, sorted(m for m in {(*HEAVY, 'torchvision')!r} if m in sys.modules)]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rc, imported = json.loads(r.stdout.strip().splitlines()[-1])
    assert rc == 0 and imported == []
    rows = json.loads(out.read_text())["rows"]
    assert {(row["split"], row["head"], row["metric"]) for row in rows} >= {("test", "best", "acc"), ("test", "1", "nmi")}


def test_no_evaluator_imports_sklearn_until_it_fits_something():
    """scikit-learn's import (about 1 s: it brings scipy.stats) is left to the evaluations that fit
    something with it, inside the function (k-means on CLD's features, SeLa's adjusted MI and PCA); NMI and
    ARI come from ncd.eval.partition."""
    assert _imported(["ncd.cli", "ncd.config", "ncd.methods.evaluate", *EVALUATOR_MODULES], ("sklearn",)) == []


def test_the_checker_sees_lightning_where_it_is():
    """The check above is real: a training module does bring Lightning in."""
    assert "lightning" in _imported(["ncd.methods.scan"], HEAVY)


def test_stages_that_train_nothing_import_no_lightning():
    assert "ncd.methods.neighbors" in LIGHT_RUNNERS  # mining: faiss only once it searches
    assert _imported(["ncd.cli", "ncd.config", *LIGHT_RUNNERS], HEAVY) == []


def test_aggregation_imports_no_numerics_stack():
    assert _imported(["ncd.cli", "ncd.eval.aggregate"], ("torch", "scipy", "sklearn", *HEAVY)) == []


def test_every_evaluator_resolves():
    """The stage table's evaluator paths name functions of those modules."""
    from ncd.stages import load

    for s in STAGES.values():
        if s.evaluate:
            assert callable(load(s.evaluate)), s.evaluate
