"""Paper-shaped tables and the reproduction scorecard.

Each paper's section is laid out like the paper's own results table: one row per experiment and
stage (or per reported setting), one column per (split, metric) the paper reports, e.g. ACC / NMI /
ARI for SCAN, NMI / aNMI / ARI / Label-Acc / linear / kNN for SeLa. A cell holds the reproduced mean
± std over seeds beside the paper's value and Δ; a setting with only a reported value is a greyed row
of the same table. The scorecard counts, per paper, the reported values, how many have a
reproduction and how many of those agree (:data:`AGREEMENT_RULE`).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping
from typing import Any

from ncd.eval.rows import base_metric
from ncd.report.tables import (_Notes, match_reported, metric_rank, paper_of, paper_rank, split_rank,
                               stage_rank)

# |Δ| within the paper's std where it gives one, else within 1 point; or within 2 × the reproduced std
AGREE_POINTS = 0.01
AGREEMENT_RULE = ("a reproduction agrees with the paper when |Δ| ≤ the paper's std where the paper gives one "
                  "(else 1 percentage point), or when |Δ| ≤ 2 × the reproduced std over seeds")

# Per paper: the columns of its own results table, in its order, as (split, metric); its names for
# them; and whether the stage is a column (CLD: kNN from the pretraining, linear from the probe stage)
# rather than a row (SCAN: one row per stage). Columns a paper's table lacks follow its own ones.
LAYOUTS: dict[str, dict[str, Any]] = {
    "Baselines": {"columns": [("test", "acc"), ("test", "nmi"), ("test", "ari")]},
    "SCAN": {"columns": [("test", "acc"), ("test", "nmi"), ("test", "ari"), ("test", "ami"), ("test", "acc_top5"),
                         ("test", "knn_top1")]},
    "UNO": {"columns": [("train-novel", "acc"), ("test-novel", "acc"), ("test-novel", "acc_agnostic"),
                        ("test-known", "acc"), ("test-known", "acc_agnostic")]},
    "SeLa": {"columns": [("train", "nmi"), ("train", "ami"), ("train", "ari"), ("train", "acc"),
                         ("test", "linear_top1"), ("test", "knn_top1")],
             "labels": {"ami": "aNMI", "acc": "Label-Acc", "linear_top1": "linear", "knn_top1": "kNN"}},
    "CLD": {"columns": [("test", "knn_top1"), ("test", "linear_top1")], "stage_in_columns": True,
            "labels": {"knn_top1": "kNN", "linear_top1": "linear"}},
    "Two-stage": {"columns": [("train", "acc"), ("train", "nmi"), ("train", "ari"), ("test", "acc"),
                              ("test", "nmi"), ("test", "ari"), ("test", "knn_top1")]},
}
METRIC_LABELS = {"acc": "ACC", "nmi": "NMI", "ari": "ARI", "ami": "AMI", "acc_top5": "ACC top-5",
                 "acc_agnostic": "ACC task-agnostic", "knn_top1": "kNN top-1", "linear_top1": "linear top-1"}
SPLIT_LABELS = {"train": "train split", "test": "test split", "train-novel": "train, novel classes",
                "test-novel": "test, novel classes", "test-known": "test, known classes"}

ColumnKey = tuple[str, str, str]  # (stage, or "" where the stage is a row; split; metric)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _signed(v: float) -> str:
    d = round(100 * v, 1)
    return f"{d + 0.0:+.1f}".replace("-", "−")  # + 0.0 turns -0.0 into +0.0


def slug(text: str) -> str:
    """An HTML id made of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.casefold()).strip("-") or "x"


def _label(paper: str, metric: str) -> str:
    base = base_metric(metric)
    labels = {**METRIC_LABELS, **LAYOUTS.get(paper, {}).get("labels", {})}
    text = labels.get(base, base)
    return text + (" (best epoch)" if metric != base else "")


def agrees(delta: float, reported_std: float | None, reproduced_std: float | None) -> bool:
    """:data:`AGREEMENT_RULE`: ``|delta| ≤ max(reported std or 1 point, 2 × reproduced std)`` (fractions)."""
    tol = max(AGREE_POINTS if reported_std is None else float(reported_std),
              0.0 if reproduced_std is None or math.isnan(reproduced_std) else 2.0 * reproduced_std)
    return abs(delta) <= tol + 1e-12


def _columns(paper: str, keys: set[ColumnKey]) -> list[dict[str, Any]]:
    order = LAYOUTS.get(paper, {}).get("columns", [])
    stage_cols = LAYOUTS.get(paper, {}).get("stage_in_columns", False)
    stages_of: dict[tuple[str, str], set[str]] = {}  # (split, plain metric) → the stages that measure it
    for st, sp, m in keys:
        stages_of.setdefault((sp, base_metric(m)), set()).add(st)

    def rank(k: ColumnKey) -> tuple:
        st, sp, m = k
        pref = order.index((sp, base_metric(m))) if (sp, base_metric(m)) in order else len(order)
        return (pref, split_rank(sp), metric_rank(m), stage_rank(st))

    cols = []
    for st, sp, m in sorted(keys, key=rank):
        label = _label(paper, m)
        if stage_cols and len(stages_of[(sp, base_metric(m))]) > 1:
            label += f" ({st})"  # the same metric from two stages
        cols.append({"key": (st, sp, m), "stage": st, "split": sp, "metric": m, "label": label,
                     "group": SPLIT_LABELS.get(sp, sp)})
    return cols


def _groups(columns: list[dict]) -> list[dict[str, Any]]:
    """The header's first row: consecutive columns of one split share a cell."""
    groups: list[dict[str, Any]] = []
    for c in columns:
        if groups and groups[-1]["label"] == c["group"]:
            groups[-1]["span"] += 1
        else:
            groups.append({"label": c["group"], "span": 1})
    return groups


def _cell(repro: dict | None, rep: dict | None, notes: _Notes) -> dict[str, Any]:
    cell: dict[str, Any] = {"text": None, "n": None, "reported": None, "delta": None, "status": "empty",
                            "mean": None, "std": None}
    if repro is not None:
        std = repro["std"]
        cell.update(text=f"{_pct(repro['mean'])} ± {'–' if std is None else _pct(std)}", n=repro["n"],
                    mean=repro["mean"], std=std, status="new")
    if rep is not None:
        cell["reported"] = notes.cell(rep)
        cell["status"] = "missing"
    if repro is not None and rep is not None:
        delta = repro["mean"] - rep["value"]
        cell["delta"] = _signed(delta)
        cell["status"] = "agree" if agrees(delta, rep.get("std"), repro["std"]) else "disagree"
    return cell


def paper_tables(rows: list[dict], reported: list[dict], protocols: Mapping[str, str] | None = None,
                 experiments: Mapping[str, dict] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Per-paper tables in the papers' own layout, the scorecard and the source notes.

    ``rows`` come from :func:`ncd.report.tables.summarise`. Returns ``(sections, scorecard, notes)``:
    a section has ``paper``, ``anchor``, ``protocol``, ``groups`` and ``columns`` (the header) and
    ``rows`` (reproduced first per dataset, then the reported-only settings, ``kind`` "reported");
    a row has ``id``, label fields and one cell per column (``text`` "mean ± std" and ``n``, the
    ``reported`` value with its footnote, ``delta`` and ``status``: agree, disagree, new
    (reproduced, nothing reported), missing (reported, not reproduced) or empty). ``experiments``
    (name → config) orders CLD's rows (:func:`pair_cld_baselines`).
    """
    notes = _Notes()
    papers: dict[str, dict[str, Any]] = {}

    def paper_block(paper: str) -> dict[str, Any]:
        return papers.setdefault(paper, {"rows": {}, "reported_rows": {}, "keys": set()})

    # reproduced rows: (experiment, stage unless a column, head) → {column key: summarised row}
    for r in rows:
        paper = paper_of(r["method"])
        stage_cols = LAYOUTS.get(paper, {}).get("stage_in_columns", False)
        block = paper_block(paper)
        rk = (r["experiment"], "" if stage_cols else r["stage"], r["head"])
        row = block["rows"].setdefault(rk, {
            "kind": "reproduced", "experiment": r["experiment"], "method": r["method"], "dataset": r["dataset"],
            "variant": r["variant"], "stage": "" if stage_cols else r["stage"], "head": r["head"], "values": {}})
        ck = (r["stage"] if stage_cols else "", r["split"], r["metric"])
        row["values"][ck] = r
        block["keys"].add(ck)
    for e in reported:
        stage_cols = LAYOUTS.get(e["paper"], {}).get("stage_in_columns", False)
        paper_block(e["paper"])["keys"].add((e["stage"] if stage_cols else "", e["split"], e["metric"]))

    used: dict[int, list[tuple[dict, dict]]] = {}  # id(reported entry) → [(row, cell)]
    sections = []
    for paper in sorted(papers, key=paper_rank):
        block = papers[paper]
        columns = _columns(paper, block["keys"])
        stage_cols = LAYOUTS.get(paper, {}).get("stage_in_columns", False)
        out_rows = []
        for row in block["rows"].values():
            cells: list[dict] = []
            out = {**{k: v for k, v in row.items() if k != "values"}, "cells": cells}
            for c in columns:
                st, sp, m = c["key"]
                stage = st if stage_cols else row["stage"]
                rep = match_reported(reported, row["method"], row["dataset"], stage, sp, m, row["variant"], row["head"])
                if rep is not None and rep["paper"] != paper:
                    rep = None
                cell = _cell(row["values"].get(c["key"]), rep, notes)
                if rep is not None:
                    used.setdefault(id(rep), []).append((out, cell, m == rep["metric"]))
                cells.append(cell)
            out_rows.append(out)
        # reported-only settings: the entries no reproduced row showed, one row per setting
        extra: dict[tuple, dict] = {}
        for e in reported:
            if e["paper"] != paper or id(e) in used:
                continue
            key = (e["method"], e["dataset"], e["variant"], "" if stage_cols else e["stage"], e["head"])
            row = extra.setdefault(key, {"kind": "reported", "experiment": "", "method": e["method"],
                                         "dataset": e["dataset"], "variant": e["variant"],
                                         "stage": "" if stage_cols else e["stage"], "head": e["head"], "entries": {}})
            row["entries"].setdefault((e["stage"] if stage_cols else "", e["split"], e["metric"]), e)
        for row in extra.values():
            cells = [_cell(None, row["entries"].get(c["key"]), notes) for c in columns]
            out_rows.append({**{k: v for k, v in row.items() if k != "entries"}, "cells": cells})
        sections.append({"paper": paper, "anchor": f"paper-{slug(paper)}", "protocol": (protocols or {}).get(paper, ""),
                         "columns": columns, "groups": _groups(columns), "rows": _order_rows(out_rows)})
    pair_cld_baselines(sections, experiments or {})
    for s in sections:
        _label_rows(s)
    return sections, _scorecard(sections, reported, used), notes.listed()


def _cell_text(c: dict) -> str:
    parts = [f"{c['text']} (n = {c['n']})"] if c["text"] else []
    if c["reported"]:
        parts.append(f"paper {c['reported']['text']}" + (f", Δ {c['delta']} ({c['status']})" if c["delta"] else ""))
    return "; ".join(parts) or "–"


def table_csvs(sections: list[dict], scorecard: list[dict], compare: list[dict]) -> dict[str, str]:
    """The report's tables as CSV texts, by file name: ``scorecard.csv``, ``<dataset>_methods.csv``
    (the table across methods) and ``paper_<paper>.csv`` (each paper's table, one text per cell)."""
    def text(header: list[str], rows: list[list[Any]]) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()

    out = {"scorecard.csv": text(["paper", "reported values", "reproduced", "agree", "disagreements"],
                                 [[c["paper"], c["reported"], c["reproduced"], c["agree"],
                                   "; ".join(d["text"] for d in c["disagreements"])] for c in scorecard])}
    for t in compare:
        out[f"{slug(t['dataset'])}_methods.csv"] = text(
            ["method", "experiment", "clusters", "ACC", "NMI", "ARI", "kNN top-1", "backbone", "parameters",
             "compute per seed", "seeds"],
            [[r["paper"], r["experiment"] + (f" ({r['variant']})" if r["variant"] else ""), r["clusters"], r["acc"]["text"], r["nmi"]["text"], r["ari"]["text"],
              r["knn"]["text"], r["backbone"], r["params"], r["compute"], r["seeds"]] for r in t["rows"]])
    for s in sections:
        out[f"paper_{slug(s['paper'])}.csv"] = text(
            ["dataset", "setting", "stage", "rows"] + [f"{c['label']} ({c['group']})" for c in s["columns"]],
            [[r["dataset"], r["setting"] + (f" ({r['head_label']})" if r["head_label"] else ""), r["stage"] or "–",
              r["kind"]] + [_cell_text(c) for c in r["cells"]] for r in s["rows"]])
    return out


def _order_rows(rows: list[dict]) -> list[dict]:
    """Datasets with a reproduction first (in experiment order), then the reported-only ones (in the
    order of reported.yaml); within a dataset the reproduced rows, then the reported-only settings."""
    datasets: list[str] = []
    for r in sorted(rows, key=lambda r: r["kind"] != "reproduced"):
        if r["dataset"] not in datasets:
            datasets.append(r["dataset"])
    pos = {id(r): i for i, r in enumerate(rows)}

    def key(r: dict) -> tuple:
        if r["kind"] == "reproduced":
            return (datasets.index(r["dataset"]), 0, r["experiment"], stage_rank(r["stage"]), r["head"] == "avg", 0)
        return (datasets.index(r["dataset"]), 1, "", (0, ""), False, pos[id(r)])

    return sorted(rows, key=key)


def pair_cld_baselines(sections: list[dict], experiments: Mapping[str, dict]) -> None:
    """CLD's table: per dataset and instance branch, the CLD row (λ > 0), then the original baseline
    (the base method's own recipe: ``cld.views`` one query view, λ = 0: NPID's ``cifar.py``, MoCo v2's
    ``main_moco.py``), then the λ = 0 ablation of the CLD pipeline; reported-only settings after them."""
    cld_views = {"npid": 2}  # CLD's views per instance branch (3 for the branches with a key encoder)

    def role(cld: dict) -> int:
        if float(cld.get("lambda", 1.0)) != 0.0:
            return 0
        views = cld.get("views")
        return 1 if views is not None and int(views) < cld_views.get(str(cld.get("instance", "npid")), 3) else 2

    for s in sections:
        if s["paper"] != paper_of("cld"):
            continue
        datasets = list(dict.fromkeys(r["dataset"] for r in s["rows"]))
        pos = {id(r): i for i, r in enumerate(s["rows"])}

        def key(r: dict) -> tuple:
            if r["kind"] != "reproduced":
                return (datasets.index(r["dataset"]), 1, "", 0, "", pos[id(r)])
            cld = (experiments.get(r["experiment"]) or {}).get("cld") or {}
            return (datasets.index(r["dataset"]), 0, str(cld.get("instance", "")), role(cld), r["experiment"], pos[id(r)])

        s["rows"].sort(key=key)


def _label_rows(section: dict) -> None:
    for i, r in enumerate(section["rows"]):
        r["id"] = f"{section['anchor']}-r{i + 1}"
        setting = r["experiment"] if r["kind"] == "reproduced" else ""
        if r["kind"] == "reported" and paper_of(r["method"]) != section["paper"]:
            setting = r["method"]  # a competitor the paper compares with
        if r["variant"]:
            setting = f"{setting} ({r['variant']})" if setting else r["variant"]
        r["setting"] = setting or "–"
        r["head_label"] = "" if r["head"] == "best" else ("mean over heads" if r["head"] == "avg" else f"head {r['head']}")


def _scorecard(sections: list[dict], reported: list[dict], used: dict[int, list]) -> list[dict]:
    """Per paper: its own reported values (competitors' rows excluded), how many have a reproduction,
    how many agree; each disagreement with a link to its row."""
    card = []
    for s in sections:
        own = [e for e in reported if e["paper"] == s["paper"] and paper_of(e["method"]) == s["paper"]]
        if not own:
            continue  # the k-means floor reports nothing
        n_repro = n_agree = 0
        wrong = []
        for e in own:
            matches = used.get(id(e), [])
            repro = [(row, cell) for row, cell, _ in matches if cell["mean"] is not None]
            if not repro:
                continue
            n_repro += 1
            # the cell of the reported metric itself (a best-over-epochs column also shows this entry)
            row, cell = next(((row, cell) for row, cell, same in matches if same and cell["mean"] is not None),
                             repro[0])
            if cell["status"] == "agree":
                n_agree += 1
            else:
                wrong.append({"href": f"#{row['id']}", "row": row["id"],
                              "text": f"{e['dataset']}, {row['setting']}, {e['stage']}, {e['split']} {e['metric']}: "
                                      f"{cell['text']} against {cell['reported']['text']} (Δ {cell['delta']})"})
        card.append({"paper": s["paper"], "anchor": s["anchor"], "reported": len(own), "reproduced": n_repro,
                     "agree": n_agree, "disagreements": wrong})
    return card


__all__ = ["AGREEMENT_RULE", "LAYOUTS", "agrees", "pair_cld_baselines", "paper_tables", "slug", "table_csvs"]
