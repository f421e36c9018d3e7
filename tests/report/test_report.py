"""The report: tables against reported numbers, figures, provenance, errors, atomicity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from ncd.errors import NcdError
from ncd.report import build_report, figures, load_metrics, load_protocols, load_reported, match_reported, summarise
from ncd.report.compare import cross_method
from ncd.report.shaped import agrees, paper_tables

ROOT = Path(__file__).resolve().parents[2]
REPORTED_YAML = ROOT / "reports" / "reported.yaml"
PROTOCOLS_YAML = ROOT / "reports" / "protocols.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = "experiment,method,stage,dataset,split,seed,head,metric,value"

# Two experiments × 3 seeds. scan_c10: variant None → matches SCAN's canonical rows.
# uno_c100: variant "80/20 v2" → matches 0.906, not the "80/20 paper" 0.850 row.
SEEDS = [0, 1, 2]
SCAN_ACC = {"scan": [0.80, 0.82, 0.77], "selflabel": [0.87, 0.89, 0.88]}
SCAN_NMI = {"scan": [0.70, 0.71, 0.73], "selflabel": [0.78, 0.79, 0.80]}
UNO_ACC = [0.91, 0.90, 0.92]
UNO_TEST_KNOWN = [0.93, 0.94, 0.95]


def _stats(vals: list[float]) -> tuple[float, float]:
    return float(np.mean(vals)), float(np.std(vals, ddof=1))


def _metrics_rows() -> list[str]:
    rows = []
    for i, s in enumerate(SEEDS):
        for stage in ("scan", "selflabel"):
            rows += [f"scan_c10,scan,{stage},cifar10,test,{s},best,acc,{SCAN_ACC[stage][i]}",
                     f"scan_c10,scan,{stage},cifar10,test,{s},0,acc,0.1",  # a non-best head: ignored
                     f"scan_c10,scan,{stage},cifar10,test,{s},best,nmi,{SCAN_NMI[stage][i]}"]
        rows += [f"uno_c100,uno,discover,cifar100,train-novel,{s},best,acc,{UNO_ACC[i]}",
                 f"uno_c100,uno,discover,cifar100,test-known,{s},best,acc,{UNO_TEST_KNOWN[i]}"]
    # One seed only, a single (non-best) head: used as the fallback, std shown as "–".
    rows.append("scan_c10,kmeans,kmeans,cifar10,test,0,0,acc,0.226")
    return rows


def _provenance(seed: int, torch: str = "2.14.1") -> dict:
    return {"config_hash": f"hash{seed}", "git_commit": "abc123", "device": "CPU (test, 2 cores)",
            "wall_time_s": 12.5 + seed, "packages": {"torch": torch, "numpy": "2.4.6"}}


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    results, bench = tmp_path / "results", tmp_path / "benchmarks"
    metrics = results / "metrics.csv"
    results.mkdir()
    metrics.write_text(COLUMNS + "\n" + "\n".join(_metrics_rows()) + "\n")
    classes = ["cat", "dog", "car"]
    for exp, stages in {"scan_c10": ["scan", "selflabel"], "uno_c100": ["discover"]}.items():
        for s in SEEDS:
            for st in stages:
                d = results / exp / f"seed{s}" / st
                d.mkdir(parents=True)
                ep = np.arange(5)
                lines = ["epoch,train_loss,loss_consistency,val_acc"]
                lines += [f"{e},{2.0 / (e + 1) + s * 0.01},{1.0 / (e + 1)},0.5" for e in ep]
                (d / "history.csv").write_text("\n".join(lines) + "\n")
                conf = {"split": "test", "head": 0, "classes": classes,
                        "matrix": [[8 + s, 1, 1], [2, 7, 1], [0, 1, 9]]}
                (d / "metrics.json").write_text(json.dumps({"confusion": conf, "provenance": _provenance(s)}))
    for rule, names in {"scan": ["scan_c10_seed0", "scan_c10_seed1"], "evaluate": ["uno_c100_seed0"]}.items():
        (bench / rule).mkdir(parents=True)
        for i, n in enumerate(names):
            (bench / rule / f"{n}.tsv").write_text(
                "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
                f"{10.0 * (i + 1):.4f}\t0:00:10\t100.1\t200.2\t90.0\t95.0\t0.1\t0.2\t50.0\t9.0\n")
    return {"metrics": metrics, "results": results, "bench": bench, "out": tmp_path / "reports"}


def _build(tree: dict, **kw) -> Path:
    exps = {"scan_c10": {"dataset": "cifar10"}, "uno_c100": {"dataset": "cifar100", "variant": "80/20 v2"}}
    return build_report(tree["metrics"], REPORTED_YAML, tree["results"], tree["bench"], tree["out"],
                        experiments=kw.pop("experiments", exps), provenance={"command": "snakemake all"}, **kw)


def _md_row(md: str, *cells: str, after: str = "") -> list[str]:
    """The cells of the first Markdown table row that starts with ``cells`` (below ``after``)."""
    for line in md[md.index(after):].splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and parts[: len(cells)] == list(cells):
            return parts
    raise AssertionError(f"no row {cells} in\n{md}")


def _tables(tree: dict, experiments: dict | None = None) -> tuple[dict, list[dict]]:
    """The paper-shaped sections (by paper) and the scorecard of the fixture's metrics."""
    exps = experiments if experiments is not None else {"scan_c10": {"dataset": "cifar10"},
                                                        "uno_c100": {"dataset": "cifar100", "variant": "80/20 v2"}}
    rows = summarise(load_metrics(tree["metrics"]), exps)
    sections, card, _ = paper_tables(rows, load_reported(REPORTED_YAML), experiments=exps)
    return {s["paper"]: s for s in sections}, card


def _cell(section: dict, row: dict, split: str, metric: str, stage: str = "") -> dict:
    col = [c["key"] for c in section["columns"]].index((stage, split, metric))
    return row["cells"][col]


def _row(section: dict, **kw) -> dict:
    hits = [r for r in section["rows"] if all(r.get(k) == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, [(r["kind"], r["setting"], r["stage"]) for r in section["rows"]])
    return hits[0]


def test_paper_shaped_tables(tree):
    papers, _ = _tables(tree)
    scan = papers["SCAN"]
    # SCAN's own columns first, in its order: ACC, NMI, ARI of the test split
    assert [c["label"] for c in scan["columns"]][:3] == ["ACC", "NMI", "ARI"]
    assert {c["split"] for c in scan["columns"][:3]} == {"test"} and scan["groups"][0]["label"] == "test split"
    for stage, rep in (("scan", 0.816), ("selflabel", 0.883)):
        mean, std = _stats(SCAN_ACC[stage])
        cell = _cell(scan, _row(scan, experiment="scan_c10", stage=stage), "test", "acc")
        assert cell["text"] == f"{100 * mean:.1f} ± {100 * std:.1f}" and cell["n"] == 3
        assert cell["reported"]["text"] == f"{100 * rep:.1f}"
        assert cell["delta"] == f"{100 * (mean - rep):+.1f}".replace("-", "−")
        assert cell["status"] == ("agree" if abs(mean - rep) <= max(0.01, 2 * std) else "disagree")
    # scan stage: mean 79.7 ± 2.5 against 81.6: |Δ| = 1.9 ≤ 2 × 2.5 → agrees; selflabel NMI 79.0 ± 1.0
    # against 79.7 → agrees; selflabel ACC 88.0 ± 1.0 against 88.3 → agrees
    assert _cell(scan, _row(scan, experiment="scan_c10", stage="scan"), "test", "acc")["status"] == "agree"
    # a column the reproduction lacks still shows the paper's number in the same row (ARI, not reproduced)
    ari = _cell(scan, _row(scan, experiment="scan_c10", stage="selflabel"), "test", "ari")
    assert ari["text"] is None and ari["reported"]["text"] == "77.2" and ari["status"] == "missing"
    # The variant picks "80/20 v2" (90.6), not "80/20 paper" (85.0); nothing reported for test-known.
    uno = papers["UNO"]
    row = _row(uno, experiment="uno_c100")
    mean, _ = _stats(UNO_ACC)
    cell = _cell(uno, row, "train-novel", "acc")
    assert cell["reported"]["text"] == "90.6" and cell["delta"] == f"{100 * (mean - 0.906):+.1f}".replace("-", "−")
    assert row["setting"] == "uno_c100 (80/20 v2)"
    known = _cell(uno, row, "test-known", "acc")
    assert known["reported"] is None and known["status"] == "new" and known["text"].startswith("94.0 ± 1.0")
    # Single seed, only head "0": that head, and "± –".
    km = _cell(papers["Baselines"], _row(papers["Baselines"], experiment="scan_c10"), "test", "acc")
    assert km["text"] == "22.6 ± –" and km["n"] == 1
    # Reported-only settings are greyed rows of the same table, competitors included.
    paper_80 = _row(uno, kind="reported", dataset="cifar100", setting="80/20 paper")
    assert _cell(uno, paper_80, "train-novel", "acc")["reported"]["text"] == "85.0"
    assert _cell(uno, _row(uno, kind="reported", setting="rs+ (80/20)"), "train-novel", "acc")["reported"]["text"] == "75.2"
    assert _cell(papers["CLD"], _row(papers["CLD"], kind="reported", dataset="cifar100", setting="MoCo+CLD"),
                 "test", "knn_top1", stage="cld")["reported"]["text"] == "58.1"
    ts = papers["Two-stage"]
    assert _cell(ts, _row(ts, kind="reported", dataset="cifar10", setting="from scratch, 6 runs"),
                 "train", "acc")["reported"]["text"] == "78.8 ± 3.2"
    # reproduced rows come first; the canonical SCAN cifar10 selflabel entry is no longer reported-only,
    # the 10-run mean still is
    kinds = [r["kind"] for r in scan["rows"]]
    assert kinds[:2] == ["reproduced", "reproduced"] and "reproduced" not in kinds[2:]
    assert not [r for r in scan["rows"] if r["kind"] == "reported" and r["dataset"] == "cifar10"
                and r["stage"] == "selflabel" and r["setting"] == "–"]
    _row(scan, kind="reported", dataset="cifar10", stage="selflabel", setting="mean of 10 runs")
    # The non-best head's 0.1 never leaks into a mean.
    assert not any(c["text"] and c["text"].startswith("10.0") for r in scan["rows"] for c in r["cells"])


def test_papers_in_order_with_sources(tree):
    _build(tree)
    md = (tree["out"] / "README.md").read_text()
    assert re.search(r"^\[\^\d+\]: SCAN: official repository model-zoo table$", md, re.M)
    assert re.search(r"^\[\^\d+\]: UNO: official repository README$", md, re.M)
    heads = [md.index(f"### {paper}\n") for paper in ("Baselines", "SCAN", "UNO", "SeLa", "CLD", "Two-stage")]
    assert heads == sorted(heads)
    # the Markdown row of a reproduced cell: mean ± std (n), the paper's value with its footnote, Δ and ✓/✗
    mean, std = _stats(SCAN_ACC["selflabel"])
    row = _md_row(md, '<a id="paper-scan-r2"></a>cifar10', "scan_c10", "selflabel")
    assert re.fullmatch(rf"{100 * mean:.1f} ± {100 * std:.1f} \(n = 3\); paper 88\.3 \[\^\d+\], Δ [−+]0\.3 ✓", row[3])
    assert row[5].startswith("paper 77.2 [^")  # ARI: reported, not reproduced


@pytest.mark.parametrize("delta, rep_std, repro_std, ok", [
    (0.009, None, None, True), (0.011, None, None, False),          # 1 point without stds
    (-0.011, None, 0.006, True), (0.013, None, 0.006, False),       # 2 × the reproduced std
    (0.004, 0.005, None, True), (0.006, 0.005, 0.002, False),       # the paper's std replaces the 1 point
    (0.006, 0.005, 0.004, True),
])
def test_agreement_rule(delta, rep_std, repro_std, ok):
    assert agrees(delta, rep_std, repro_std) is ok


def test_scorecard_counts_and_links(tree):
    papers, card = _tables(tree)
    card = {c["paper"]: c for c in card}
    rep = load_reported(REPORTED_YAML)
    for paper in ("SCAN", "UNO", "SeLa", "CLD", "Two-stage"):
        own = [e for e in rep if e["paper"] == paper and e["method"] not in ("rs+", "jia et al.", "ncl")]
        assert card[paper]["reported"] == len(own), paper
    # SCAN cifar10: scan and selflabel ACC and NMI are reproduced; UNO: the 80/20 v2 number
    assert (card["SCAN"]["reproduced"], card["UNO"]["reproduced"], card["SeLa"]["reproduced"]) == (4, 1, 0)
    # UNO 91.0 ± 1.0 against 90.6 agrees; SCAN's scan NMI 71.3 ± 1.5 against 71.5 agrees, all four do
    assert card["UNO"]["agree"] == 1 and card["SCAN"]["agree"] == 4
    # a disagreement: selflabel ACC far from the paper
    tree["metrics"].write_text(tree["metrics"].read_text().replace(",best,acc,0.87", ",best,acc,0.80")
                               .replace(",best,acc,0.89", ",best,acc,0.81").replace(",best,acc,0.88", ",best,acc,0.805"))
    papers, card = _tables(tree)
    scan = {c["paper"]: c for c in card}["SCAN"]
    assert scan["agree"] == 3 and len(scan["disagreements"]) == 1
    d = scan["disagreements"][0]
    row = next(r for r in papers["SCAN"]["rows"] if f"#{r['id']}" == d["href"])
    assert row["stage"] == "selflabel" and "against 88.3" in d["text"]
    html = _build(tree).read_text()
    assert f'<tr id="{row["id"]}" class="reproduced">' in html and f'href="{d["href"]}"' in html
    assert html.index('id="scorecard"') < html.index('<table class="paper">')


def test_selected_on_test_rows_take_the_papers_number():
    """AUDIT A8: a best-over-epochs value (chosen on the test split) is matched to the paper's number of
    its plain metric, and its column comes right after the final model's."""
    import pandas as pd

    from ncd.eval.rows import base_metric, selected_on_test

    rep = load_reported(REPORTED_YAML)
    name = selected_on_test("knn_top1")
    assert name == "knn_top1_selected_on_test" and base_metric(name) == "knn_top1"
    plain = match_reported(rep, "cld", "cifar10", "cld", "test", "knn_top1", "NPID+CLD")
    assert plain is not None and match_reported(rep, "cld", "cifar10", "cld", "test", name, "NPID+CLD") is plain
    metrics = pd.DataFrame([
        {"experiment": "c", "method": "cld", "stage": "cld", "dataset": "cifar10", "split": "test", "seed": seed,
         "head": "best", "metric": metric, "value": value}
        for seed in (0, 1) for metric, value in ((name, 0.86 + seed / 100), ("knn_top1", 0.84 + seed / 500))])
    rows = summarise(metrics, {"c": {"variant": "NPID+CLD"}})
    assert [r["metric"] for r in rows] == ["knn_top1", name]
    sections, card, _ = paper_tables(rows, rep)
    cld = next(s for s in sections if s["paper"] == "CLD")
    keys = [c["key"] for c in cld["columns"]]
    assert keys.index(("cld", "test", name)) == keys.index(("cld", "test", "knn_top1")) + 1
    row = _row(cld, experiment="c")
    final, best = _cell(cld, row, "test", "knn_top1", "cld"), _cell(cld, row, "test", name, "cld")
    assert final["reported"]["text"] == best["reported"]["text"] == "86.7"
    assert best["delta"] == "−0.2" and final["delta"] == "−2.6"
    assert best["status"] == "agree" and final["status"] == "disagree"
    # the scorecard judges the paper's number by the final model's value, not the best epoch's
    assert {c["paper"]: c for c in card}["CLD"]["agree"] == 0


def test_cross_method_table(tree):
    """digits, three methods: one row each under one protocol, backbone and compute from the run files."""
    rows = []
    for s in SEEDS:
        rows += [f"km,kmeans,cluster,digits,test,{s},best,acc,{0.70 + s / 100}",
                 f"km,kmeans,cluster,digits,test,{s},best,nmi,0.6", f"km,kmeans,cluster,digits,test,{s},best,ari,0.5",
                 f"sc,scan,pretrain,digits,test,{s},best,knn_top1,{0.95 + s / 200}",
                 f"sc,scan,scan,digits,test,{s},best,acc,0.80", f"sc,scan,selflabel,digits,test,{s},best,acc,{0.90 + s / 100}",
                 f"sc,scan,selflabel,digits,test,{s},best,nmi,0.85", f"sc,scan,selflabel,digits,test,{s},best,ari,0.8",
                 f"un,uno,discover,digits,test,{s},best,acc,0.92", f"un,uno,discover,digits,test,{s},best,knn_top1,0.97",
                 f"un,uno,discover,digits,train-novel,{s},best,acc,0.99",
                 f"alone,sela,sela,cifar10,test,{s},best,acc,0.5"]  # one method only on cifar10: no table
    tree["metrics"].write_text(COLUMNS + "\n" + "\n".join(rows) + "\n")
    bench = tree["bench"]
    for rule, name, wall, cpu in (("pretrain", "sc_seed0", 30.0, 50.0), ("pretrain", "sc_seed1", 30.0, 52.0),
                                  ("evaluate", "sc_seed0_selflabel", 3.0, 4.0), ("discover", "un_seed0", 20.0, 21.0)):
        (bench / rule).mkdir(parents=True, exist_ok=True)
        (bench / rule / f"{name}.tsv").write_text(f"s\tcpu_time\n{wall}\t{cpu}\n")
    run = tree["results"] / "sc" / "seed0" / "selflabel"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"provenance": {"backbone": {"name": "small_cnn", "params": 65184}}}))
    exps = {"km": {"method": "kmeans"}, "sc": {"method": "scan", "backbone": "small_cnn"},
            "un": {"method": "uno", "backbone": "small_cnn", "runtime": {"gpu": True, "devices": 2}}}
    from ncd.report.provenance import read_benchmarks, read_runs

    tables = cross_method(summarise(load_metrics(tree["metrics"]), exps), exps, read_runs(tree["results"]),
                          read_benchmarks(bench))
    assert [t["dataset"] for t in tables] == ["digits"]
    by = {r["experiment"]: r for r in tables[0]["rows"]}
    assert list(by) == ["km", "sc", "un"]  # METHODS order
    # SCAN: the clustering of its last stage (selflabel), the kNN of its pretext
    assert by["sc"]["acc"]["text"] == "91.0 ± 1.0" and by["sc"]["acc"]["stage"] == "selflabel"
    assert by["sc"]["knn"]["text"] == "95.5 ± 0.5" and by["sc"]["nmi"]["text"] == "85.0 ± 0.0"
    assert by["km"]["knn"]["text"] == "–" and by["km"]["backbone"] == "pixels" and by["km"]["params"] == "–"
    assert by["sc"]["backbone"] == "small_cnn" and by["sc"]["params"] == "65.2 k"
    assert by["sc"]["compute"] == f"{(50 + 52 + 4) / 3:.0f} CPU-s"  # cpu_time summed, per seed
    assert by["un"]["compute"] == f"{20 * 2 / 3600 / 3:.2f} GPU-h" and by["un"]["labels"]
    assert by["un"]["acc"]["top"] and not by["sc"]["acc"]["top"] and by["un"]["knn"]["top"]


def test_html_figures_provenance(tree):
    index = _build(tree)
    html = index.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count('<table class="paper">') == 6  # every paper: reproduced or reported-only rows
    assert "<td>uno_c100 (80/20 v2)" in html and "90.6" in html and 'title="variant: 80/20 v2;' in html
    assert '<meta name="viewport"' in html and 'href="../results/metrics.csv"' in html
    figs = sorted(p.name for p in (tree["out"] / "figures").iterdir())
    assert figs == ["confusion_scan_c10_scan.png", "confusion_scan_c10_selflabel.png", "confusion_uno_c100_discover.png",
                    "loss_scan_c10_scan.png", "loss_scan_c10_selflabel.png", "loss_uno_c100_discover.png"]
    for f in figs:
        data = (tree["out"] / "figures" / f).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f'src="figures/{f}"' in html
    md = (tree["out"] / "README.md").read_text()
    assert "](figures/loss_uno_c100_discover.png)" in md
    # Provenance: per run, packages collapsed, benchmarks summed per rule (10 + 20 s for scan).
    row = _md_row(md, "scan_c10", "2", "selflabel", after="### Runs")
    assert row[3:] == ["`hash2`", "`abc123`", "CPU (test, 2 cores)", "14.5 s"]
    assert "All runs agree: `numpy 2.4.6`, `torch 2.14.1`" in md
    bench = "### Wall time per rule"
    assert _md_row(md, "scan", after=bench)[1] == "30.0 s" and _md_row(md, "evaluate", after=bench)[1] == "10.0 s"
    assert _md_row(md, "**all**", after=bench)[1] == "**40.0 s**"
    assert _md_row(md, "scan", "scan_c10_seed1", after=bench)[2] == "20.0 s"
    assert _md_row(md, "command", after="## Provenance")[1] == "snakemake all"
    assert not list(tree["out"].rglob("*.tmp"))


def test_tables_as_csv(tree):
    import csv

    _build(tree)
    folder = tree["out"] / "tables"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["paper_baselines.csv", "paper_cld.csv", "paper_scan.csv", "paper_sela.csv", "paper_two-stage.csv",
                     "paper_uno.csv", "scorecard.csv"]
    card = list(csv.DictReader((folder / "scorecard.csv").open()))
    assert [r["paper"] for r in card] == ["SCAN", "UNO", "SeLa", "CLD", "Two-stage"] and card[0]["reproduced"] == "4"
    scan = list(csv.DictReader((folder / "paper_scan.csv").open()))
    row = next(r for r in scan if r["setting"] == "scan_c10" and r["stage"] == "selflabel")
    mean, std = _stats(SCAN_ACC["selflabel"])
    assert row["ACC (test split)"].startswith(f"{100 * mean:.1f} ± {100 * std:.1f} (n = 3); paper 88.3, Δ ")
    assert row["ARI (test split)"] == "paper 77.2" and row["rows"] == "reproduced"
    html = (tree["out"] / "index.html").read_text()
    assert 'href="tables/scorecard.csv"' in html
    stale = folder / "paper_gone.csv"
    stale.write_text("x\n")
    _build(tree)
    assert not stale.exists()


def test_packages_differ(tree):
    p = tree["results"] / "uno_c100" / "seed1" / "discover" / "metrics.json"
    p.write_text(json.dumps({"provenance": _provenance(1, torch="2.13.0")}))  # and no confusion
    _build(tree)
    md = (tree["out"] / "README.md").read_text()
    assert "Same in all runs: `numpy 2.4.6`" in md
    differ = "Packages whose versions differ"
    assert _md_row(md, "uno_c100", "1", "discover", after=differ)[3:] == ["2.13.0"]
    assert _md_row(md, "uno_c100", "2", "discover", after=differ)[3:] == ["2.14.1"]
    # The confusion figure comes from the first seed that has one.
    assert (tree["out"] / "figures" / "confusion_uno_c100_discover.png").is_file()


def test_html_escapes(tree):
    tree["metrics"].write_text(COLUMNS + "\n<b>x</b>,scan,scan,cifar10,test,0,best,acc,0.5\n")
    html = _build(tree, experiments={}).read_text()
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html


def test_missing_metrics(tree):
    tree["metrics"].unlink()
    with pytest.raises(NcdError, match=r"metrics\.csv.*experiment, method, stage"):
        _build(tree)
    assert not (tree["out"] / "index.html").exists()


def test_bad_columns(tree):
    tree["metrics"].write_text("experiment,method,value\nscan_c10,scan,0.5\n")
    with pytest.raises(NcdError, match=r"metrics\.csv.*missing column\(s\) stage.*expected columns"):
        _build(tree)


def test_failure_leaves_no_report(tree, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(figures, "loss_figure", boom)
    with pytest.raises(RuntimeError, match="figure failed"):
        _build(tree)
    out = tree["out"]
    assert not (out / "index.html").exists() and not (out / "README.md").exists()
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_stale_figures_removed(tree):
    _build(tree)
    stale = tree["out"] / "figures" / "loss_gone_scan.png"
    stale.write_bytes(PNG_MAGIC)
    _build(tree)
    assert not stale.exists()


def test_reported_yaml():
    raw = yaml.safe_load(REPORTED_YAML.read_text())
    assert isinstance(raw, list) and len(raw) > 100
    required = {"paper", "method", "dataset", "stage", "split", "metric", "value", "head", "source"}
    seen = set()
    for e in raw:
        assert required <= e.keys(), e
        assert e["paper"] in {"SCAN", "UNO", "SeLa", "CLD", "Two-stage"}
        assert e["dataset"] in {"cifar10", "cifar100", "cifar100-20", "stl10", "imagenet", "imagenet-50",
                                "imagenet-100", "imagenet-200"}
        assert e["split"] in {"train", "test", "train-novel", "test-novel", "test-known"}
        assert e["metric"] in {"acc", "nmi", "ari", "ami", "acc_top5", "acc_agnostic", "knn_top1", "linear_top1"}
        assert e["head"] in {"best", "avg"}
        assert 0.0 <= e["value"] <= 1.0 and (e.get("std") is None or 0.0 <= e["std"] <= 1.0)
        key = tuple(e[k] for k in ("method", "dataset", "stage", "split", "metric", "head")) + (e.get("variant"),)
        assert key not in seen, f"duplicate entry {key}"
        seen.add(key)
    rep = load_reported(REPORTED_YAML)

    def value(**kw):
        hits = [e for e in rep if all(e.get(k) == v for k, v in kw.items())]
        assert len(hits) == 1, (kw, hits)
        return hits[0]

    assert value(method="scan", dataset="cifar10", stage="selflabel", metric="acc", variant=None)["value"] == 0.883
    assert value(method="scan", dataset="imagenet", metric="ami")["value"] == 0.512
    assert value(method="uno", dataset="cifar100", split="train-novel", variant="80/20 v2")["value"] == 0.906
    assert value(method="uno", dataset="cifar100", split="test-novel", metric="acc_agnostic",
                 variant="50/50 paper")["value"] == 0.506
    assert value(method="uno", dataset="cifar10", variant="5/5 paper", split="train-novel")["std"] == 0.005
    assert value(method="cld", dataset="cifar100", variant="MoCo+CLD")["value"] == 0.581
    assert value(method="sela", dataset="imagenet", metric="linear_top1", variant="Aug++ ResNet-50 10x3k")["value"] == 0.688
    assert value(method="twostage", dataset="stl10", head="avg")["value"] == 0.566
    assert value(method="twostage", dataset="cifar100", stage="superand")["value"] == 0.615
    # UNO's "CIFAR100-20" is CIFAR-100 with 20 novel classes, never the superclass dataset.
    assert not [e for e in rep if e["paper"] == "UNO" and e["dataset"] == "cifar100-20"]


def test_reported_yaml_validation(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump([{"paper": "SCAN", "method": "scan", "dataset": "cifar10", "stage": "scan",
                                    "split": "test", "metric": "acc", "value": 81.6, "source": "x"}]))
    with pytest.raises(NcdError, match="not a fraction"):
        load_reported(bad)
    bad.write_text(yaml.safe_dump([{"paper": "SCAN", "value": 0.5}]))
    with pytest.raises(NcdError, match="needs the keys"):
        load_reported(bad)


# ------------------------------------------------------------------------------------ protocols
def _protocol(md: str, paper: str) -> str:
    """The protocol line under a paper's heading ("" when there is none)."""
    section = md[md.index(f"### {paper}\n"):].split("\n### ", 1)[0]
    line = next((l for l in section.splitlines() if l.startswith("*Protocol:* ")), "")
    return line.removeprefix("*Protocol:* ")


def test_protocols_from_yaml(tree, tmp_path):
    _build(tree)  # default: reports/protocols.yaml next to reported.yaml
    md = (tree["out"] / "README.md").read_text()
    shipped = load_protocols(PROTOCOLS_YAML)
    assert set(shipped) == {"Baselines", "SCAN", "UNO", "SeLa", "CLD", "Two-stage"}
    for paper, text in shipped.items():
        assert _protocol(md, paper) == text
    assert "pretext_kmeans: k-means (scikit-learn, n_init restarts, seeded)" in shipped["SCAN"]
    # A custom file changes the text (line breaks collapse); a paper it leaves out has no protocol line.
    custom = tmp_path / "custom.yaml"
    custom.write_text("SCAN: |\n  Custom SCAN\n  protocol <i>here</i>.\nUNO: UNO's own words.\n")
    html = _build(tree, protocols=custom).read_text()
    md = (tree["out"] / "README.md").read_text()
    assert _protocol(md, "SCAN") == "Custom SCAN protocol <i>here</i>."
    assert _protocol(md, "UNO") == "UNO's own words."
    assert _protocol(md, "Baselines") == "" and "*Protocol:*" not in md.split("### SCAN\n")[0]
    assert "Custom SCAN protocol &lt;i&gt;here&lt;/i&gt;." in html and shipped["SCAN"][:40] not in md
    # No protocols.yaml next to reported.yaml (and none given): the report has no protocol lines.
    reported = tmp_path / "elsewhere" / "reported.yaml"
    reported.parent.mkdir()
    reported.write_text(REPORTED_YAML.read_text())
    build_report(tree["metrics"], reported, tree["results"], tree["bench"], tree["out"])
    assert "*Protocol:*" not in (tree["out"] / "README.md").read_text()


@pytest.mark.parametrize("text, match", [
    ("SCAN: [unclosed\n", r"not valid YAML"),
    ("- SCAN\n- UNO\n", r"expected a mapping of paper name \(Baselines, SCAN, .*\) to its protocol text, got list"),
    ("SCAN:\n  acc: Hungarian\n", r"the protocol of SCAN must be a non-empty text, got \{'acc'"),
    ("Scan: typo\n", r"unknown paper 'Scan'; expected a mapping of paper name"),
])
def test_bad_protocols(tree, tmp_path, text, match):
    bad = tmp_path / "protocols.yaml"
    bad.write_text(text)
    with pytest.raises(NcdError, match=rf"^{re.escape(str(bad))}: .*{match}"):
        _build(tree, protocols=bad)
    assert not (tree["out"] / "index.html").exists()
    with pytest.raises(NcdError, match=r"gone\.yaml: protocols file not found; expected a mapping"):
        _build(tree, protocols=tmp_path / "gone.yaml")


def test_pretext_kmeans_in_scan_section(tree):
    rows = [f"scan_c10,scan,pretext_kmeans,cifar10,test,{s},best,{m},{v + 0.01 * s}"
            for s in SEEDS for m, v in (("acc", 0.60), ("nmi", 0.50), ("ari", 0.40))]
    with tree["metrics"].open("a") as f:
        f.write("\n".join(rows) + "\n")
    papers, _ = _tables(tree)
    scan = papers["SCAN"]
    # pipeline order (ncd.stages.STAGES): pretext_kmeans before scan and selflabel
    assert [r["stage"] for r in scan["rows"] if r["kind"] == "reproduced"] == ["pretext_kmeans", "scan", "selflabel"]
    row = _row(scan, experiment="scan_c10", stage="pretext_kmeans")
    assert _cell(scan, row, "test", "acc")["text"] == "61.0 ± 1.0" and _cell(scan, row, "test", "ari")["n"] == 3
    assert not [r for r in papers["Baselines"]["rows"] if r["stage"] == "pretext_kmeans"]  # not a Baselines row


def test_cross_method_rows_name_their_variant(tree):
    rows = [f"a,cld,cld,digits,test,{s},best,knn_top1,0.9" for s in SEEDS] + \
           [f"b,kmeans,cluster,digits,test,{s},best,acc,0.7" for s in SEEDS]
    tree["metrics"].write_text(COLUMNS + "\n" + "\n".join(rows) + "\n")
    md = (_build(tree, experiments={"a": {"method": "cld", "variant": "NPID (CLD pipeline, λ = 0)"},
                                   "b": {"method": "kmeans"}}).parent / "README.md").read_text()
    assert _md_row(md, "CLD", "a (NPID (CLD pipeline, λ = 0))", after="## All methods on digits")[6] == "**90.0 ± 0.0**"  # the best kNN, bold
    assert _md_row(md, "Baselines", "b", after="## All methods on digits")[3] == "**70.0 ± 0.0**"
