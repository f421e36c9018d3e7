"""The table across methods: every method that ran on a dataset, measured with one protocol.

For each dataset on which several methods ran, one row per experiment: Hungarian ACC (K = number of
classes), NMI and ARI on the test split of the clustering the method itself selects (its ``best``
head, or k-means on the features for the representation learners), the weighted kNN top-1 of its
backbone's features, the backbone with its parameter count, and the compute per seed summed from
Snakemake's benchmark files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ncd.report.tables import paper_of, paper_rank, stage_rank
from ncd.stages import METHODS

# How each method's clustering on the test split comes about (the column "clusters").
CLUSTERS_FROM = {
    "kmeans": "k-means on the pixels",
    "scan": "self-labelled head",
    "uno": "known ‖ novel heads, task-agnostic",
    "sela": "lowest-loss head",
    "cld": "k-means on the features",
    "twostage": "lowest-loss head",
}
# methods that see labels (of the known classes) during training
USES_LABELS = {"uno"}


def _latest_test_row(rows: list[dict], metric: str) -> dict | None:
    """The summarised test-split row of ``metric`` (head ``best``) of the latest stage that has one."""
    cands = [r for r in rows if r["split"] == "test" and r["metric"] == metric and r["head"] == "best"]
    return max(cands, key=lambda r: stage_rank(r["stage"])) if cands else None


def _fmt(r: dict | None) -> dict[str, Any]:
    if r is None:
        return {"text": "–", "mean": None, "stage": None}
    std = "–" if r["std"] is None else f"{100 * r['std']:.1f}"
    return {"text": f"{100 * r['mean']:.1f} ± {std}", "mean": r["mean"], "stage": r["stage"], "n": r["n"]}


def _compute(experiment: str, cfg: Mapping[str, Any], benchmarks: list[dict], seeds: int) -> str:
    """Wall time summed over the experiment's jobs, per seed: GPU-hours (× devices) on GPU runs,
    CPU-seconds (the benchmark's ``cpu_time``, else wall seconds) otherwise."""
    pat = re.compile(rf"^{re.escape(experiment)}_seed\d+(?:_\w+)?$")
    mine = [b for b in benchmarks if pat.match(b["name"])]
    if not mine or seeds < 1:
        return "–"
    rt = cfg.get("runtime") or {}
    if rt.get("gpu"):
        hours = sum(b["seconds"] for b in mine if not math.isnan(b["seconds"])) * int(rt.get("devices", 1)) / 3600
        return f"{hours / seeds:.2f} GPU-h"
    cpu = [b.get("cpu_seconds", math.nan) for b in mine]
    if any(math.isnan(c) for c in cpu):
        cpu = [b["seconds"] for b in mine]
    return f"{sum(c for c in cpu if not math.isnan(c)) / seeds:.0f} CPU-s"


def _params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def cross_method(rows: list[dict], experiments: Mapping[str, dict] | None, runs: list[dict],
                 benchmarks: list[dict]) -> list[dict[str, Any]]:
    """Per dataset with at least two methods: one row per experiment under one protocol.

    ``rows`` come from :func:`ncd.report.tables.summarise`, ``runs`` from
    :func:`ncd.report.provenance.read_runs` (their metrics.json give the backbone and its parameter
    count), ``benchmarks`` from :func:`ncd.report.provenance.read_benchmarks`.
    """
    experiments = experiments or {}
    by_exp: dict[str, list[dict]] = {}
    for r in rows:
        by_exp.setdefault(r["experiment"], []).append(r)
    backbone: dict[str, dict] = {}
    for run in runs:
        b = ((run.get("metrics") or {}).get("provenance") or {}).get("backbone")
        if b and run["experiment"] not in backbone:
            backbone[run["experiment"]] = b
    datasets: dict[str, list[dict]] = {}
    for exp, rs in by_exp.items():
        method, dataset = rs[0]["method"], rs[0]["dataset"]
        acc, knn = _latest_test_row(rs, "acc"), _latest_test_row(rs, "knn_top1")
        if acc is None and knn is None:
            continue
        cfg = experiments.get(exp) or {}
        b = backbone.get(exp)
        name = b["name"] if b else ("pixels" if method == "kmeans" else str(cfg.get("backbone") or "–"))
        seeds = max(r["n"] for r in rs)
        datasets.setdefault(dataset, []).append({
            "experiment": exp, "method": method, "paper": paper_of(method),
            "variant": cfg.get("variant") or "",
            "clusters": CLUSTERS_FROM.get(method, "best head"), "labels": method in USES_LABELS,
            "acc": _fmt(acc), "nmi": _fmt(_latest_test_row(rs, "nmi")), "ari": _fmt(_latest_test_row(rs, "ari")),
            "knn": _fmt(knn), "backbone": name, "params": _params(b["params"] if b else None),
            "compute": _compute(exp, cfg, benchmarks, seeds), "seeds": seeds,
        })
    tables = []
    for dataset, items in datasets.items():
        if len({i["method"] for i in items}) < 2:
            continue
        items.sort(key=lambda i: (paper_rank(i["paper"]), list(METHODS).index(i["method"])
                                  if i["method"] in METHODS else len(METHODS), i["experiment"]))
        best_acc = max((i["acc"]["mean"] for i in items if i["acc"]["mean"] is not None), default=None)
        best_knn = max((i["knn"]["mean"] for i in items if i["knn"]["mean"] is not None), default=None)
        for i in items:
            i["acc"]["top"] = best_acc is not None and i["acc"]["mean"] == best_acc
            i["knn"]["top"] = best_knn is not None and i["knn"]["mean"] == best_knn
        tables.append({"dataset": dataset, "rows": items})
    return tables


__all__ = ["CLUSTERS_FROM", "cross_method"]
