"""The report's provenance: the run folders, their metrics.json and history.csv, Snakemake's benchmarks."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ncd.errors import NcdError
from ncd.report.tables import stage_rank


# ------------------------------------------------------------------------------------ run files
def find_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every ``results_dir/{experiment}/seed{seed}/{stage}/`` directory, sorted (stages in pipeline order)."""
    runs: list[dict[str, Any]] = []
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return runs
    for seed_dir in results_dir.glob("*/seed*"):
        m = re.fullmatch(r"seed(\d+)", seed_dir.name)
        if not (m and seed_dir.is_dir()):
            continue
        for stage_dir in seed_dir.iterdir():
            if stage_dir.is_dir():
                runs.append({"experiment": seed_dir.parent.name, "seed": int(m.group(1)),
                             "stage": stage_dir.name, "dir": stage_dir})
    runs.sort(key=lambda r: (r["experiment"], stage_rank(r["stage"]), r["seed"]))
    return runs


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NcdError(f"{path}: not valid JSON ({e})") from e


def _read_history(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise NcdError(f"{path}: cannot read the training history ({e})") from e


def read_runs(results_dir: Path) -> list[dict[str, Any]]:
    """:func:`find_runs`, each with its ``metrics`` (metrics.json) and ``history`` (history.csv), None if absent."""
    runs = find_runs(results_dir)
    for r in runs:
        r["metrics"] = _read_json(r["dir"] / "metrics.json")
        r["history"] = _read_history(r["dir"] / "history.csv")
    return runs


def read_benchmarks(benchmarks_dir: Path) -> list[dict[str, Any]]:
    """Snakemake benchmark TSVs ``{rule}/{name}.tsv`` → rule, name, seconds and cpu_seconds (the
    ``cpu_time`` column, NaN where absent), each the mean over repeats."""
    out: list[dict[str, Any]] = []
    benchmarks_dir = Path(benchmarks_dir)
    if not benchmarks_dir.is_dir():
        return out
    for p in sorted(benchmarks_dir.rglob("*.tsv")):
        rel = p.relative_to(benchmarks_dir)
        try:
            df = pd.read_csv(p, sep="\t")
            s = df["s"].astype(float)
            cpu = pd.to_numeric(df["cpu_time"], errors="coerce") if "cpu_time" in df else None
        except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise NcdError(f"{p}: not a Snakemake benchmark file (need a column 's'): {e}") from e
        rule = rel.parts[0] if len(rel.parts) > 1 else "(none)"
        name = str(Path(*rel.parts[1:]).with_suffix("")) if len(rel.parts) > 1 else rel.stem
        out.append({"rule": rule, "name": name, "seconds": float(s.mean()) if len(s) else math.nan,
                    "cpu_seconds": float(cpu.mean()) if cpu is not None and len(cpu) else math.nan})
    return out


# ----------------------------------------------------------------------------------- provenance
def _fmt_seconds(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(s):
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s:.1f} s ({s / 60:.1f} min)"


def _run_rows(runs: Iterable[dict]) -> list[dict[str, Any]]:
    """One row per run that carries provenance (in its metrics.json)."""
    rows = []
    for r in runs:
        prov = (r.get("metrics") or {}).get("provenance")
        if prov is None:
            continue
        rows.append({"experiment": r["experiment"], "seed": r["seed"], "stage": r["stage"],
                     "config_hash": str(prov.get("config_hash", "–")),
                     "git_commit": str(prov.get("git_commit", "–")),
                     "device": str(prov.get("device", "–")),
                     "wall_time": _fmt_seconds(prov.get("wall_time_s")),
                     "packages": {str(k): str(v) for k, v in (prov.get("packages") or {}).items()}})
    return rows


def _benchmark_totals(benchmarks: list[dict]) -> dict[str, Any]:
    per_rule: dict[str, float] = {}
    for b in benchmarks:
        per_rule[b["rule"]] = per_rule.get(b["rule"], 0.0) + (0.0 if math.isnan(b["seconds"]) else b["seconds"])
    return {
        "benchmarks": [{**b, "time": _fmt_seconds(b["seconds"])} for b in benchmarks],
        "per_rule": [{"rule": k, "time": _fmt_seconds(v)} for k, v in sorted(per_rule.items())],
        "total": _fmt_seconds(sum(per_rule.values())) if per_rule else None,
    }


def provenance(runs: Iterable[dict], benchmarks: list[dict], extra: dict | None) -> dict[str, Any]:
    """The provenance block: global facts (``extra``), per-run rows, packages common to all runs or
    differing between them, and wall time per benchmarked rule."""
    rows = _run_rows(runs)
    packages = [r["packages"] for r in rows]
    names = sorted({k for p in packages for k in p})
    common = [n for n in names if len({p.get(n, "–") for p in packages}) == 1]
    return {
        "global": [{"key": str(k), "value": v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)}
                   for k, v in (extra or {}).items()],
        "runs": rows,
        "packages_common": [{"name": n, "version": packages[0][n]} for n in common],
        "packages_differing": [n for n in names if n not in common],
        **_benchmark_totals(benchmarks),
    }
