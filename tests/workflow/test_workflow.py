"""The workflow itself: its DAG for both configurations, lint, bad config, and a real tiny run."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def snakemake(*args: str, cwd: Path = ROOT, timeout: int = 600, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": env_path or f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def job_counts(out: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run."""
    counts = {}
    for m in re.finditer(r"^([a-z_]+)\s+(\d+)$", out, re.M):
        counts[m.group(1)] = int(m.group(2))
    return counts


def dirs(tmp: Path) -> list[str]:
    return ["--config", f"results_dir={tmp}/results", f"data_dir={tmp}/data", f"reports_dir={tmp}/reports"]


def test_embedded_dag(tmp_path):
    r = snakemake("-n", "--cores", "1", *dirs(tmp_path))
    assert r.returncode == 0, r.stderr
    c = job_counts(r.stdout + r.stderr)
    # 3 seeds: k-means (cluster), and SCAN's pretrain -> mine -> scan -> selflabel with pretext_kmeans
    # beside them (4 evaluated stages per seed)
    assert c["prepare_dataset"] == 1
    for rule in ("cluster", "pretrain", "mine", "pretext_kmeans", "scan", "selflabel", "pretrain_supervised",
                 "discover"):
        assert c[rule] == 3, (rule, c)
    # CLD: cld_digits and its baseline npid_digits, one cld stage each per seed
    assert c["cld"] == 6
    # SeLa: sela_digits, one sela stage per seed
    assert c["sela"] == 3
    # two-stage: Super-AND then stage 2 per seed, both evaluated
    assert c["superand"] == c["twostage"] == 3
    assert c["evaluate"] == 18 + 6 + 3 + 6
    assert c["aggregate"] == c["report"] == c["all"] == 1


def test_paper_dag_without_data(tmp_path):
    r = snakemake("-n", "--cores", "1", "--configfile", "workflow/experiments/paper.yaml", *dirs(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    c = job_counts(out)
    # CIFAR-10, CIFAR-100-20, STL-10 (5 seeds) and ImageNet-50/100/200 (3 seeds); all subsets share one ImageNet folder
    assert c["pretrain"] == 3 * 5 + 3 * 3
    assert c["scan"] == c["selflabel"] == c["mine"] == c["pretext_kmeans"] == 24
    assert c["cluster"] == 15
    # UNO: CIFAR-10 5/5, CIFAR-100 80/20 and 50/50 (5 seeds), ImageNet A/B/C (3 seeds)
    assert c["pretrain_supervised"] == c["discover"] == 3 * 5 + 3 * 3
    # CLD: NPID and MoCo on CIFAR-10/100 with their lambda = 0 ablations and NPID's original-recipe
    # baselines (3 seeds), MoCo v2 and InfoMin on ImageNet with their ablations and MoCo v2's original
    # recipe (1 seed); the ImageNet ones each with a linear probe
    assert c["cld"] == 10 * 3 + 5 * 1
    assert c["cld_probe"] == 5
    # SeLa: CIFAR-10 (3 seeds), AlexNet and ResNet-50 10x3k on ImageNet (1 seed)
    assert c["sela"] == 3 + 2
    # two-stage: CIFAR-10, CIFAR-100-20, CIFAR-100, STL-10 (5 seeds); the stage-2-only ablation is not in `all`
    assert c["superand"] == c["twostage"] == 4 * 5
    assert "twostage_cifar10-stage2only" not in out
    assert c["prepare_dataset"] == 5  # cifar10, cifar100-20, cifar100, stl10, imagenet
    assert f"{tmp_path}/data/imagenet/READY" in out
    assert "scan_digits" not in out  # run_experiments keeps config.yaml's experiments out


def test_lint_is_clean():
    r = snakemake("--lint")
    assert r.returncode == 0
    assert "Congratulations, your workflow is in a good condition!" in r.stdout + r.stderr


def test_unknown_config_key_stops_the_workflow(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiments": {"scan_digits": {"scan": {"lrr": 0.1}}}}))
    r = snakemake("-n", "--cores", "1", "--configfile", str(bad), *dirs(tmp_path))
    assert r.returncode != 0
    assert "unknown config key 'lrr' in experiments.scan_digits.scan" in r.stdout + r.stderr


TINY = {
    "seeds": [0],
    "run_experiments": ["kmeans_digits", "scan_digits", "uno_digits"],
    "runtime": {"accelerator": "cpu", "threads": 1},
    "experiments": {
        "kmeans_digits": {"method": "kmeans", "dataset": "digits", "cluster": {"n_init": 1}},
        "scan_digits": {
            "method": "scan", "dataset": "digits", "backbone": "small_cnn",
            "backbone_kwargs": {"width": 8, "pool": 2},
            "pretrain": {"epochs": 2, "batch_size": 256, "features_dim": 16},
            "scan": {"epochs": 2, "batch_size": 256, "num_heads": 2},
            "selflabel": {"epochs": 1, "batch_size": 256, "confidence_threshold": 0.5},
            "pretext_kmeans": {"n_init": 2},
        },
        "uno_digits": {
            "backbone_kwargs": {"width": 8, "pool": 2},
            "pretrain_supervised": {"epochs": 1, "batch_size": 128},
            "discover": {"epochs": 2, "batch_size": 128, "num_heads": 2, "hidden_dim": 32, "proj_dim": 16},
        },
    },
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The whole DAG on digits with a few epochs, once for the tests below: (folder, config, result)."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    return tmp, cfg, snakemake("--cores", "2", "--configfile", str(cfg), *dirs(tmp))


@pytest.mark.timeout(600)
def test_real_end_to_end_run(tiny_run):
    """The whole DAG on digits with a few epochs: outputs, metrics table, report, then nothing to redo."""
    tmp_path, cfg, r = tiny_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = tmp_path / "results"
    for stage in ("pretrain", "scan", "selflabel"):
        blob = torch.load(res / f"scan_digits/seed0/{stage}/model.ckpt", weights_only=True)
        assert blob["arch"]["backbone"] == "small_cnn"
        assert not (res / f"scan_digits/seed0/{stage}/last.ckpt").exists()  # removed once done
        assert (res / f"logs/{stage}/scan_digits_seed0.log").read_text().strip()
        assert (res / f"benchmarks/{stage}/scan_digits_seed0.tsv").is_file()
    assert (res / "scan_digits/seed0/mine/neighbors.npz").is_file()
    rows = list(csv.DictReader((res / "metrics.csv").open()))
    assert list(rows[0]) == ["experiment", "method", "stage", "dataset", "split", "seed", "head", "metric", "value"]
    best = {(r["experiment"], r["stage"], r["metric"]): float(r["value"]) for r in rows if r["head"] == "best"}
    assert 0.6 < best[("kmeans_digits", "cluster", "acc")] < 0.9
    for key in [("scan_digits", "scan", "acc"), ("scan_digits", "selflabel", "acc"), ("scan_digits", "pretrain", "knn_top1"),
                ("scan_digits", "pretext_kmeans", "acc"), ("scan_digits", "pretext_kmeans", "nmi")]:
        assert 0.0 <= best[key] <= 1.0
    assert {r["head"] for r in rows if r["stage"] == "scan"} == {"0", "1", "best"}
    uno = {(r["split"], r["head"], r["metric"]) for r in rows if r["experiment"] == "uno_digits"}
    for split in ("train-novel", "test-novel"):
        for head in ("0", "1", "best", "avg"):
            assert {(split, head, m) for m in ("acc", "acc_agnostic", "nmi", "ari")} <= uno
    assert {("test-known", "best", "acc"), ("test-known", "best", "acc_agnostic")} <= uno
    # the shared protocol of the table across methods, on every class of the test split
    assert {("test", "best", m) for m in ("acc", "nmi", "ari", "knn_top1")} <= uno
    assert "uno_digits" in (tmp_path / "reports/README.md").read_text()
    readme = (tmp_path / "reports/README.md").read_text()
    assert "scan_digits" in readme and "kmeans_digits" in readme
    assert (tmp_path / "reports/index.html").is_file()
    assert list((tmp_path / "reports/figures").glob("confusion_scan_digits_selflabel.png"))
    r = snakemake("-n", "--cores", "2", "--configfile", str(cfg), *dirs(tmp_path))
    assert "Nothing to be done" in r.stdout + r.stderr
    _a_change_reruns_exactly_what_it_affects(tmp_path)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["report.zip", "report.html"])
def test_snakemakes_own_report(tiny_run, name):
    """`snakemake --report` of a finished run holds the report, its figures and the metrics table."""
    tmp_path, cfg, r = tiny_run
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / name
    r = snakemake("--report", str(out), "--configfile", str(cfg), *dirs(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    figures = sorted(p.name for p in (tmp_path / "reports/figures").glob("*.png"))
    assert "confusion_scan_digits_selflabel.png" in figures
    if name.endswith(".zip"):
        names = zipfile.ZipFile(out).namelist()
        for f in ["index.html", "metrics.csv", "scorecard.csv", "digits_methods.csv", "paper_scan.csv", *figures]:
            assert any(n.endswith("/" + f) for n in names), (f, names)
    else:
        text = out.read_text(errors="replace")
        assert out.stat().st_size > 100_000 and "confusion_scan_digits_selflabel.png" in text


@pytest.mark.timeout(600)
def test_report_renders_in_a_browser(tiny_run):
    """reports/index.html in headless Chromium at 1280 px and at a phone's width: every image loads,
    every table has rows, no console error, no sideways scrolling of the page; screenshots beside it."""
    tmp_path, _, r = tiny_run
    assert r.returncode == 0, r.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "tests" / "report"))
    from report_browser import check_report

    index = tmp_path / "reports" / "index.html"
    pngs = list((tmp_path / "reports" / "figures").glob("*.png"))
    html = index.read_text()
    assert "All methods on digits, one protocol" in html and html.count('<table class="paper">') == 6
    for width, res in check_report(index).items():
        assert res["images"] == len(pngs) > 0 and res["broken"] == [], (width, res)
        assert res["tables"] >= 8 and res["empty_tables"] == [], (width, res)
        assert res["errors"] == [], (width, res)
        assert res["page_width"] <= res["view_width"], (width, res)
        assert res["first_heading"].startswith("Scorecard")
        shot = Path(res["screenshot"])
        assert shot.parent == index.parent and shot.read_bytes().startswith(b"\x89PNG")


def scheduled(out: str) -> set[tuple[str, str]]:
    """``(rule, "exp/stage")`` of every job of a dry run (``stage`` is the evaluated stage, or the rule)."""
    jobs = set()
    for block in re.split(r"\n(?=\[[^\n]*\]\n(?:local)?rule )", out):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not m:
            continue
        w = dict(re.findall(r"(\w+)=([^,\s]+)", (re.search(r"wildcards: (.*)", block) or [""])[0]))
        jobs.add((m.group(1), f"{w.get('exp', '')}/{w.get('stage', m.group(1) if 'exp' in w else '')}"))
    return jobs


def _a_change_reruns_exactly_what_it_affects(tmp_path: Path) -> None:
    """After a full run, each edit schedules, in one invocation, exactly the stages that read the
    edited key, those downstream of them, their evaluations, aggregate and report."""
    final = {("aggregate", "/"), ("report", "/"), ("all", "/")}

    def dry(edit) -> set[tuple[str, str]]:
        cfg = yaml.safe_load(yaml.safe_dump(TINY))
        edit(cfg["experiments"])
        f = tmp_path / "edited.yaml"
        f.write_text(yaml.safe_dump(cfg))
        r = snakemake("-n", "--cores", "1", "--configfile", str(f), *dirs(tmp_path))
        assert r.returncode == 0, r.stderr[-3000:]
        return scheduled(r.stdout + r.stderr) - final

    assert dry(lambda e: e["scan_digits"]["selflabel"].update(epochs=2)) == {
        ("selflabel", "scan_digits/selflabel"), ("evaluate", "scan_digits/selflabel")}
    stages = ("pretrain", "mine", "pretext_kmeans", "scan", "selflabel")
    assert dry(lambda e: e["scan_digits"]["pretrain"].update(epochs=3)) == {
        *((s, f"scan_digits/{s}") for s in stages),
        *(("evaluate", f"scan_digits/{s}") for s in stages if s != "mine")}
    assert dry(lambda e: e["uno_digits"]["discover"].update(epochs=3)) == {
        ("discover", "uno_digits/discover"), ("evaluate", "uno_digits/discover")}


def test_adding_a_seed_does_not_rerun_existing_runs(tmp_path):
    """Stage commands do not receive the seed list, so their params stay the same."""
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({**TINY, "seeds": [0]}))
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump({**TINY, "seeds": [0, 1]}))
    show = ("-n", "--cores", "1", "--printshellcmds", *dirs(tmp_path))
    def cmds(cfg: Path) -> set[str]:
        r = snakemake(*show, "--configfile", str(cfg))
        return {line[line.index("python -m ncd pretrain "):] for line in (r.stdout + r.stderr).splitlines()
                if "python -m ncd pretrain " in line}

    first, second = cmds(one), cmds(two)
    assert len(first) == 1 and len(second) == 2
    assert first < second  # seed 0's command is unchanged
