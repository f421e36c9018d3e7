"""The report's tables: the metrics table and the papers' numbers read, matched and summarised per paper.

The vocabulary and every display order come from :mod:`ncd.stages`: papers in ``METHODS`` order, stages
in ``STAGES`` (pipeline) order, splits and metrics in ``SPLITS`` / ``METRICS`` order; anything not listed
sorts after, alphabetically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ncd.errors import NcdError
from ncd.eval.rows import base_metric
from ncd.stages import METHODS, METRICS, METRICS_COLUMNS, SPLITS, STAGES

REPORTED_KEYS = ("paper", "method", "dataset", "stage", "split", "metric", "value", "source")


# ---------------------------------------------------------------------------------------- orders
def _rank(values: Sequence[str], v: Any) -> tuple[int, str]:
    return (values.index(v) if v in values else len(values), str(v))


def papers() -> list[str]:
    """The papers in report order (that of their first method in ``METHODS``)."""
    return list(dict.fromkeys(m.paper for m in METHODS.values()))


def paper_of(method: str) -> str:
    """The paper whose section shows ``method``'s rows (the method's own name if it is not in METHODS)."""
    m = METHODS.get(method)
    return m.paper if m is not None else method


def paper_rank(paper: str) -> tuple[int, str]:
    return _rank(papers(), paper)


def stage_rank(stage: str) -> tuple[int, str]:
    return _rank(tuple(STAGES), stage)


def split_rank(split: str) -> tuple[int, str]:
    return _rank(SPLITS, split)


def metric_rank(metric: str) -> tuple[int, str, bool]:
    # a best-over-epochs value sorts right after its final value
    return _rank(METRICS, base_metric(metric)) + (metric != base_metric(metric),)


# --------------------------------------------------------------------------------------- inputs
def load_metrics(path: Path) -> pd.DataFrame:
    """Read ``results/metrics.csv``; NcdError if it is missing or lacks a contract column."""
    path = Path(path)
    expected = ", ".join(METRICS_COLUMNS)
    if not path.is_file():
        raise NcdError(f"{path}: metrics table not found; expected a CSV with columns {expected}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise NcdError(f"{path}: cannot read the metrics table ({e}); expected columns {expected}") from e
    missing = [c for c in METRICS_COLUMNS if c not in df.columns]
    if missing:
        raise NcdError(f"{path}: missing column(s) {', '.join(missing)}; expected columns {expected}")
    df = df[list(METRICS_COLUMNS)].copy()
    try:
        df["seed"] = df["seed"].astype(int)
        df["value"] = df["value"].astype(float)
    except ValueError as e:
        raise NcdError(f"{path}: seed must be an integer and value a number ({e})") from e
    for c in ("experiment", "method", "stage", "dataset", "split", "head", "metric"):
        df[c] = df[c].astype(object).map(lambda s: str(s).strip())
    return df


def load_reported(path: Path) -> list[dict[str, Any]]:
    """Read ``reports/reported.yaml``: a list of entries keyed like the metrics table.

    Fills the optional keys (``variant`` None, ``head`` "best", ``std`` None); NcdError names
    the entry that lacks a key or whose value is not a fraction in [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise NcdError(f"{path}: reported numbers not found")
    try:
        entries = yaml.safe_load(path.read_text()) or []
    except yaml.YAMLError as e:
        raise NcdError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(entries, list):
        raise NcdError(f"{path}: expected a list of entries, got {type(entries).__name__}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or any(k not in e for k in REPORTED_KEYS):
            raise NcdError(f"{path}: entry {i} ({e!r}) needs the keys {', '.join(REPORTED_KEYS)}")
        e = {**e, "variant": e.get("variant"), "head": str(e.get("head", "best")), "std": e.get("std")}
        for k in ("value", "std"):
            v = e[k]
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise NcdError(f"{path}: entry {i} ({e['paper']} {e['method']} {e['dataset']}): "
                               f"{k} {v!r} is not a fraction in [0, 1]")
        for k in ("paper", "method", "dataset", "stage", "split", "metric"):
            e[k] = str(e[k])
        out.append(e)
    return out


def load_protocols(path: Path, known: Iterable[str] | None = None) -> dict[str, str]:
    """Read ``reports/protocols.yaml``: paper name → how its columns are measured (one paragraph).

    ``known`` are the paper names allowed as keys (default: the papers of ``ncd.stages.METHODS``).
    Whitespace, line breaks included, collapses to single spaces. NcdError names the file and what
    was expected when it is missing, not YAML, not such a mapping, or names an unknown paper.
    """
    path = Path(path)
    known = list(dict.fromkeys(known if known is not None else papers()))
    expected = f"a mapping of paper name ({', '.join(known)}) to its protocol text"
    if not path.is_file():
        raise NcdError(f"{path}: protocols file not found; expected {expected}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise NcdError(f"{path}: not valid YAML ({e}); expected {expected}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise NcdError(f"{path}: expected {expected}, got {type(raw).__name__}")
    out = {}
    for paper, text in raw.items():
        if paper not in known:
            raise NcdError(f"{path}: unknown paper {paper!r}; expected {expected}")
        if not isinstance(text, str) or not text.strip():
            raise NcdError(f"{path}: the protocol of {paper} must be a non-empty text, got {text!r}; "
                           f"expected {expected}")
        out[paper] = " ".join(text.split())
    return out


# -------------------------------------------------------------------------------------- matching
def _norm_variant(v: Any) -> str | None:
    return None if v is None else " ".join(str(v).split()).casefold()


def match_reported(reported: list[dict], method: str, dataset: str, stage: str, split: str,
                   metric: str, variant: str | None, head: str = "best") -> dict | None:
    """The reported entry for a reproduced row, or None.

    Same method, dataset, stage, split and metric; the experiment's variant, else the
    canonical (variant-less) entry of that key. ``avg`` entries only match averaged heads; an
    averaged head whose variant names no average (a paper reports "lowest-loss head" and "average
    of 5 heads" as two rows) takes the one average of its key from the same source as the best-head
    entry its experiment's variant matches. A best-over-epochs metric (``*_selected_on_test``) takes
    the entry of its plain metric, so the paper's number stands beside both values.
    """
    key = (method, dataset, stage, split, base_metric(metric))
    cands = [r for r in reported if (r["method"], r["dataset"], r["stage"], r["split"], r["metric"]) == key
             and (r["head"] == "avg") == (head == "avg")]
    want = _norm_variant(variant)
    for r in cands:
        if _norm_variant(r["variant"]) == want:
            return r
    if want is not None:
        for r in cands:
            if r["variant"] is None:
                return r
    if head == "avg" and want is not None:
        best = match_reported(reported, method, dataset, stage, split, metric, variant, "best")
        if best is not None and _norm_variant(best["variant"]) == want:
            same = [r for r in cands if r["source"] == best["source"]]
            if len(same) == 1:
                return same[0]
    return None


# ---------------------------------------------------------------------------------------- tables
def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _signed(v: float) -> str:
    d = round(100 * v, 1)
    return f"{d + 0.0:+.1f}"  # + 0.0 turns -0.0 into +0.0


def summarise(metrics: pd.DataFrame, experiments: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """One row per (experiment, method, dataset, stage, split, metric) of the best head.

    Uses head ``best``, or the only head where there is one (keys with several heads and no
    ``best`` are left out), followed by a row for the mean over heads (``avg``) where the metrics
    have one. Values per seed are averaged first; std over seeds with ddof=1. Rows are ordered by
    experiment, dataset, stage, split and metric (the order in which the report numbers its sources).
    """
    experiments = experiments or {}
    keys = ["experiment", "method", "dataset", "stage", "split", "metric"]
    rows = []
    for key, g in metrics.groupby(keys, sort=False):
        heads = sorted(set(g["head"]))
        chosen = "best" if "best" in heads else heads[0] if len(heads) == 1 else None
        if chosen is None:
            continue
        for head in [chosen] + (["avg"] if "avg" in heads and chosen != "avg" else []):
            per_seed = g[g["head"] == head].groupby("seed")["value"].mean()
            n = len(per_seed)
            rows.append({**dict(zip(keys, key)), "head": head, "n": n, "seeds": list(per_seed.index),
                         "mean": float(per_seed.mean()),
                         "std": float(per_seed.std(ddof=1)) if n > 1 else None,
                         "variant": (experiments.get(key[0]) or {}).get("variant")})
    rows.sort(key=lambda r: (r["experiment"], r["dataset"], stage_rank(r["stage"]), split_rank(r["split"]),
                             metric_rank(r["metric"])))
    return rows


class _Notes:
    """The source footnotes: "paper: source" → number, in order of first use."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def cell(self, r: dict) -> dict:
        """A reported entry as a table cell: its text, hover title and footnote number."""
        text = _pct(r["value"]) + (f" ± {_pct(r['std'])}" if r.get("std") is not None else "")
        title = f"variant: {r['variant'] or '(canonical)'}; head: {r['head']}; source: {r['source']}"
        note = self.numbers.setdefault(f"{r['paper']}: {r['source']}", len(self.numbers) + 1)
        return {"text": text, "title": title, "note": note}

    def listed(self) -> list[dict]:
        return [{"n": n, "text": s} for s, n in self.numbers.items()]
