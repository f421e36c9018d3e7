"""benchmarks/digits_robustness.py: the floors table from metrics tables, and the config it hands Snakemake."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("digits_robustness", ROOT / "benchmarks" / "digits_robustness.py")
dr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dr)

COLUMNS = ("experiment", "method", "stage", "dataset", "split", "seed", "head", "metric", "value")


def _metrics(path: Path, values: dict[int, float], head: str = "best") -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for seed, v in values.items():
            w.writerow({"experiment": "uno_digits", "method": "uno", "stage": "discover", "dataset": "digits",
                        "split": "train-novel", "seed": seed, "head": head, "metric": "acc", "value": v})
            w.writerow({"experiment": "uno_digits", "method": "uno", "stage": "discover", "dataset": "digits",
                        "split": "train-novel", "seed": seed, "head": "0", "metric": "acc", "value": 0.1})
    return path


def test_table_gives_min_median_max_and_the_seeds_below_the_floor(tmp_path):
    one = _metrics(tmp_path / "one.csv", {0: 0.95, 1: 0.91, 2: 0.97, 3: 0.94})
    two = _metrics(tmp_path / "two.csv", {0: 0.96, 1: 0.935, 2: 0.99, 3: 0.94})
    lines = dr.table({1: one, 2: two}, [0, 1, 2])  # seed 3 is not asked for
    uno = [line for line in lines if line.startswith("UNO")]
    assert len(uno) == 2
    assert uno[0].split()[5:10] == ["1", "0.910", "0.950", "0.970", "1"]
    assert uno[0].endswith("0:0.950 1:0.910 2:0.970")
    assert uno[1].split()[5:10] == ["2", "0.935", "0.960", "0.990", "-"]
    assert any(line.startswith("SeLa") and "no rows" in line for line in lines)


def test_set_reaches_nested_keys_and_rejects_a_bare_name():
    cfg: dict = {}
    dr._set(cfg, "uno_digits.discover.epochs=100")
    dr._set(cfg, "sela_digits.sela.augment={crop_scale: [0.8, 1.0]}")
    assert cfg["experiments"] == {"uno_digits": {"discover": {"epochs": 100}},
                                  "sela_digits": {"sela": {"augment": {"crop_scale": [0.8, 1.0]}}}}
    with pytest.raises(SystemExit, match="expected EXPERIMENT.KEY"):
        dr._set(cfg, "epochs=3")


def test_summarize_only_without_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dr.main(["--summarize-only", "--out", str(tmp_path), "--threads", "1"])
    assert e.value.code == 2 and "t1/metrics.csv does not exist" in capsys.readouterr().err


def test_the_config_it_writes_is_a_valid_workflow_config(tmp_path, monkeypatch):
    """The run's config (seeds, threads, the floors' experiments, an override) builds the DAG it should."""
    calls, real_run = [], subprocess.run
    monkeypatch.setattr(dr.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    target = dr.run(tmp_path, 2, [3, 4], ["uno_digits.discover.epochs=7"], cores=2)
    cfg = yaml.safe_load((tmp_path / "t2" / "config.yaml").read_text())
    assert cfg["seeds"] == [3, 4] and cfg["runtime"] == {"threads": 2}
    assert calls[0][1] == str(target) and calls[0][-1] == str(tmp_path / "t2" / "config.yaml")
    bindir = Path(sys.executable).parent
    dry = real_run([str(bindir / "snakemake"), "-n", str(target), "--configfile", calls[0][-1], "--cores", "2"],
                   cwd=ROOT, capture_output=True, text=True, timeout=300,
                   env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    for exp in ("scan_digits", "uno_digits", "sela_digits", "cld_digits", "twostage_digits"):
        for seed in (3, 4):
            assert f"{tmp_path}/t2/{exp}/seed{seed}/" in out, (exp, seed)
    assert "seed0/" not in out
