"""Render the results report: reproduced vs. reported tables, figures and provenance.

Everything is computed in memory first and written last (figures, README.md, then index.html),
each file through a temporary name and a rename: a failure part-way leaves no new index.html
and no half-written file.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ncd.errors import NcdError
from ncd.utils import atomic_path, write_text_atomic

METRICS_COLUMNS = ("experiment", "method", "stage", "dataset", "split", "seed", "head", "metric", "value")
REPORTED_KEYS = ("paper", "method", "dataset", "stage", "split", "metric", "value", "source")
PAPER_OF_METHOD = {"kmeans": "Baselines", "scan": "SCAN", "uno": "UNO", "sela": "SeLa", "cld": "CLD",
                   "twostage": "Two-stage"}
PAPER_ORDER = ["Baselines", "SCAN", "UNO", "SeLa", "CLD", "Two-stage"]
# Display orders; anything not listed sorts after, alphabetically.
STAGE_ORDER = ["pretrain", "kmeans", "scan", "selflabel", "discover", "cluster", "superand", "twostage"]
SPLIT_ORDER = ["train", "test", "train-novel", "test-novel", "test-known"]
METRIC_ORDER = ["acc", "nmi", "ari", "ami", "acc_top5", "acc_agnostic", "knn_top1", "linear_top1"]
_TEMPLATES = Path(__file__).with_name("templates")
# How each paper's columns are measured, printed above its table.
PROTOCOLS = {
    "Baselines": "k-means (scikit-learn, 10 restarts) on the raw pixels of the train split; Hungarian accuracy, "
                 "NMI and ARI on the test split (SCAN's protocol).",
    "SCAN": "Test split. acc: Hungarian accuracy with K = number of classes present (SCAN's protocol); nmi, ari: "
            "scikit-learn on the raw cluster ids; acc_top5: the 5 most probable clusters through the same matching; "
            "knn_top1: weighted kNN (k = 200, σ = 0.1) of the pretext features; head best = lowest validation SCAN loss "
            "(scan stage) or the only head (selflabel).",
    "UNO": "Novel classes of the train split (train-novel, the classical NCD number) and of the test split "
           "(test-novel): acc = task-aware clustering accuracy (argmax over the head's novel logits), acc_agnostic = "
           "task-agnostic (argmax over known ‖ novel logits), both with UNO's square Hungarian matching after shifting "
           "the targets to start at 0; nmi, ari on the task-aware ids. test-known: plain accuracy of the labeled head "
           "(acc) and of known ‖ novel logits of the best head (acc_agnostic). head best = smallest summed cluster loss "
           "over the last epoch; avg = mean over heads.",
    "SeLa": "Stage sela. train: the self-labels of the label matrix (the last Sinkhorn-Knopp assignment of each head) "
            "against the train classes, as SeLa's README reports for ImageNet; test: each head's argmax on the test "
            "split. acc (\"Label-Acc\"): Hungarian one-to-one matching of clusters to classes on the count matrix "
            "(scikit-learn/SciPy; when K ≠ number of classes only min(K, C) pairs are matched and samples of unmatched "
            "clusters count as errors; sela.acc_matching: majority maps each cluster to its most frequent class); nmi: "
            "NMI (arithmetic), ami: adjusted NMI (\"aNMI\"), ari: scikit-learn on the raw ids. head best = the head "
            "with the lowest mean training loss over the last epoch. knn_top1: weighted kNN (σ = 0.1; k = 10 after "
            "PCA to 128 dimensions on CIFAR as cifar.py's final report, k = 200 on digits) of the L2-normalised "
            "penultimate features, train split as the bank, the test transform for both. linear_top1: a linear layer "
            "(SGD, step schedule) on the frozen penultimate features computed once with the test transform (no "
            "augmentation, single crop; the official AlexNet probes read conv layers, the ResNet probe 10-crops).",
    "Two-stage": "Stage twostage: train split with the test transform (the official protocols.test; test split "
                 "beside it), per head the Hungarian accuracy over C × C votes (acc; SCAN's hungarian_evaluate), NMI "
                 "and ARI (scikit-learn, beyond the official code); head best = the head with the lowest summed MI "
                 "loss in the epoch with the lowest mean training loss, whose model is the one kept (the paper's "
                 "'lowest-loss head'); avg = mean over the 5 heads (the README's 'average'). Stage superand: "
                 "knn_top1 = weighted kNN (k = 200, σ = 0.1) of the test split's embeddings against the Super-AND "
                 "memory bank (the official monitor; train features not recomputed), after the last round.",
    "CLD": "Test split. knn_top1: weighted kNN (k = 200, σ = the instance temperature) of the instance-branch "
           "features, the train features recomputed with the test transform (CIFAR's protocol); linear_top1: linear "
           "probe on the frozen backbone (ImageNet's); acc, nmi, ari: k-means (K = classes) on the same features, "
           "fitted on the train split, Hungarian matching (beyond the official code). Each CLD row is followed by "
           "its baseline: the same setting with λ = 0 (plain NPID / MoCo / MoCo v2 / InfoMin from the same code, "
           "projection heads included), whose reported number is the original method's.",
}


def _order(values: list[str]):
    return lambda v: (values.index(v) if v in values else len(values), str(v))


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


def _norm_variant(v: Any) -> str | None:
    return None if v is None else " ".join(str(v).split()).casefold()


def match_reported(reported: list[dict], method: str, dataset: str, stage: str, split: str,
                   metric: str, variant: str | None, head: str = "best") -> dict | None:
    """The reported entry for a reproduced row, or None.

    Same method, dataset, stage, split and metric; the experiment's variant, else the
    canonical (variant-less) entry of that key. ``avg`` entries only match averaged heads; an
    averaged head whose variant names no average (a paper reports "lowest-loss head" and "average
    of 5 heads" as two rows) takes the one average of its key from the same source as the best-head
    entry its experiment's variant matches.
    """
    key = (method, dataset, stage, split, metric)
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
    have one. Values per seed are averaged first; std over seeds with ddof=1.
    """
    experiments = experiments or {}
    keys = ["experiment", "method", "dataset", "stage", "split", "metric"]
    rows = []
    for key, g in metrics.groupby(keys, sort=False):
        heads = sorted(set(g["head"]))
        head = "best" if "best" in heads else heads[0] if len(heads) == 1 else None
        if head is None:
            continue
        for head in [head] + (["avg"] if "avg" in heads and head != "avg" else []):
            per_seed = g[g["head"] == head].groupby("seed")["value"].mean()
            n = len(per_seed)
            rows.append({**dict(zip(keys, key)), "head": head, "n": n, "seeds": list(per_seed.index),
                         "mean": float(per_seed.mean()),
                         "std": float(per_seed.std(ddof=1)) if n > 1 else None,
                         "variant": (experiments.get(key[0]) or {}).get("variant")})
    rows.sort(key=lambda r: (r["experiment"], r["dataset"], _order(STAGE_ORDER)(r["stage"]),
                             _order(SPLIT_ORDER)(r["split"]), _order(METRIC_ORDER)(r["metric"])))
    return rows


def _paper_sections(rows: list[dict], reported: list[dict]) -> tuple[list[dict], list[dict]]:
    """Per-paper tables (reproduced beside reported, then reported-only) and the source notes."""
    notes: dict[str, int] = {}  # "paper: source" → footnote number

    def note(paper: str, source: str) -> int:
        return notes.setdefault(f"{paper}: {source}", len(notes) + 1)

    def reported_cell(r: dict) -> dict:
        text = _pct(r["value"]) + (f" ± {_pct(r['std'])}" if r.get("std") is not None else "")
        title = f"variant: {r['variant'] or '(canonical)'}; head: {r['head']}; source: {r['source']}"
        return {"text": text, "title": title, "note": note(r["paper"], r["source"])}

    used: set[int] = set()
    by_paper: dict[str, dict] = {}
    for row in rows:
        paper = PAPER_OF_METHOD.get(row["method"], row["method"])
        rep = match_reported(reported, row["method"], row["dataset"], row["stage"], row["split"],
                             row["metric"], row["variant"], row["head"])
        std = "–" if row["std"] is None else _pct(row["std"])
        out = {**row, "variant": row["variant"] or "–",
               "reproduced": f"{_pct(row['mean'])} ± {std} (n = {row['n']})",
               "reported": reported_cell(rep) if rep else None,
               "delta": _signed(row["mean"] - rep["value"]) if rep else "–"}
        if rep:
            used.add(id(rep))
        by_paper.setdefault(paper, {"paper": paper, "rows": [], "reported_only": []})["rows"].append(out)
    for r in reported:
        if id(r) not in used:
            sec = by_paper.setdefault(r["paper"], {"paper": r["paper"], "rows": [], "reported_only": []})
            sec["reported_only"].append({**r, "variant": r["variant"] or "–", "reported": reported_cell(r)})
    sections = sorted(by_paper.values(), key=lambda s: _order(PAPER_ORDER)(s["paper"]))
    for s in sections:
        s["protocol"] = PROTOCOLS.get(s["paper"], "")
    return sections, [{"n": n, "text": s} for s, n in notes.items()]


def _pair_cld_baselines(sections: list[dict], experiments: dict[str, dict]) -> None:
    """CLD's table: every row directly above its baseline's (same dataset, instance branch, split
    and metric, λ = 0), so it reads CLD, baseline, CLD, baseline."""
    def key(row: dict) -> tuple:
        cld = (experiments.get(row["experiment"]) or {}).get("cld") or {}
        return (row["dataset"], str(cld.get("instance", "")), _order(SPLIT_ORDER)(row["split"]),
                _order(METRIC_ORDER)(row["metric"]), float(cld.get("lambda", 1.0)) == 0.0, row["experiment"])

    for s in sections:
        if s["paper"] == "CLD":
            s["rows"].sort(key=key)


# --------------------------------------------------------------------------------------- figures
def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)  # Agg explicitly: no display, no pyplot global state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def confusion_figure(confusion: dict, title: str) -> bytes:
    """PNG of a confusion matrix (rows true, columns predicted) with counts where readable."""
    m = np.asarray(confusion["matrix"], dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise NcdError(f"{title}: confusion matrix must be a non-empty 2-D list, got shape {m.shape}")
    classes = [str(c) for c in (confusion.get("classes") or [])]
    size = min(12.0, 2.5 + 0.45 * max(m.shape))
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if max(m.shape) <= 20:  # beyond that the numbers are unreadable
        thresh = m.max() / 2 if m.max() > 0 else 0.5
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if v > thresh else "black")
        if len(classes) == m.shape[0]:
            ax.set_yticks(range(m.shape[0]), classes)
        if len(classes) == m.shape[1]:
            ax.set_xticks(range(m.shape[1]), classes, rotation=45, ha="right")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    split, head = confusion.get("split", "?"), confusion.get("head", "?")
    ax.set_title(f"{title} ({split} split, head {head})")
    return _png(fig)


def loss_columns(history: pd.DataFrame) -> list[str]:
    """The numeric loss columns of a history table (names containing 'loss')."""
    return [c for c in history.columns if "loss" in c.lower() and pd.api.types.is_numeric_dtype(history[c])]


def loss_figure(histories: dict[int, pd.DataFrame], title: str) -> bytes | None:
    """PNG of every seed's loss columns against epoch (colour = column, line style = seed)."""
    cols = sorted({c for h in histories.values() for c in loss_columns(h)})
    if not cols:
        return None
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for si, (seed, h) in enumerate(sorted(histories.items())):
        x = h["epoch"] if "epoch" in h.columns else pd.Series(range(len(h)), index=h.index)
        for ci, c in enumerate(cols):
            if c not in h.columns:
                continue
            ok = h[c].notna()  # loggers write train and val rows separately
            ax.plot(x[ok], h[c][ok], color=f"C{ci % 10}", linestyle=styles[si % len(styles)],
                    marker="." if ok.sum() < 3 else None, label=f"{c} (seed {seed})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(cols) * len(histories) > 8 else 1)
    return _png(fig)


# ------------------------------------------------------------------------------------ run files
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def find_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every ``results_dir/{experiment}/seed{seed}/{stage}/`` directory, sorted."""
    runs = []
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
    runs.sort(key=lambda r: (r["experiment"], _order(STAGE_ORDER)(r["stage"]), r["seed"]))
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


def read_benchmarks(benchmarks_dir: Path) -> list[dict[str, Any]]:
    """Snakemake benchmark TSVs ``{rule}/{name}.tsv`` → rule, name, seconds (mean over repeats)."""
    out = []
    benchmarks_dir = Path(benchmarks_dir)
    if not benchmarks_dir.is_dir():
        return out
    for p in sorted(benchmarks_dir.rglob("*.tsv")):
        rel = p.relative_to(benchmarks_dir)
        try:
            s = pd.read_csv(p, sep="\t")["s"].astype(float)
        except (KeyError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise NcdError(f"{p}: not a Snakemake benchmark file (need a column 's'): {e}") from e
        rule = rel.parts[0] if len(rel.parts) > 1 else "(none)"
        name = str(Path(*rel.parts[1:]).with_suffix("")) if len(rel.parts) > 1 else rel.stem
        out.append({"rule": rule, "name": name, "seconds": float(s.mean()) if len(s) else math.nan})
    return out


def _fmt_seconds(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "–"
    if math.isnan(s):
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s:.1f} s ({s / 60:.1f} min)"


def _provenance(runs: Iterable[dict], benchmarks: list[dict], extra: dict | None) -> dict[str, Any]:
    rows, packages = [], []
    for r in runs:
        prov = (r.get("metrics") or {}).get("provenance")
        if prov is None:
            continue
        pk = {str(k): str(v) for k, v in (prov.get("packages") or {}).items()}
        packages.append(pk)
        rows.append({"experiment": r["experiment"], "seed": r["seed"], "stage": r["stage"],
                     "config_hash": str(prov.get("config_hash", "–")),
                     "git_commit": str(prov.get("git_commit", "–")),
                     "device": str(prov.get("device", "–")),
                     "wall_time": _fmt_seconds(prov.get("wall_time_s")), "packages": pk})
    names = sorted({k for p in packages for k in p})
    common = [n for n in names if len({p.get(n, "–") for p in packages}) == 1]
    differing = [n for n in names if n not in common]
    per_rule: dict[str, float] = {}
    for b in benchmarks:
        per_rule[b["rule"]] = per_rule.get(b["rule"], 0.0) + (0.0 if math.isnan(b["seconds"]) else b["seconds"])
    return {
        "global": [{"key": str(k), "value": v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)}
                   for k, v in (extra or {}).items()],
        "runs": rows,
        "packages_common": [{"name": n, "version": packages[0][n]} for n in common],
        "packages_differing": differing,
        "benchmarks": [{**b, "time": _fmt_seconds(b["seconds"])} for b in benchmarks],
        "per_rule": [{"rule": k, "time": _fmt_seconds(v)} for k, v in sorted(per_rule.items())],
        "total": _fmt_seconds(sum(per_rule.values())) if per_rule else None,
    }


# ---------------------------------------------------------------------------------------- render
def _md_cell(v: Any) -> str:
    """Make a value safe inside a GitHub Markdown table cell."""
    return " ".join(str(v).split()).replace("|", "\\|")


def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)), autoescape=autoescape,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md"] = _md_cell
    return env


def build_report(metrics_csv: Path, reported_yaml: Path, results_dir: Path, benchmarks_dir: Path,
                 out_dir: Path, experiments: dict[str, dict] | None = None,
                 provenance: dict | None = None) -> Path:
    """Render ``out_dir/index.html``, ``out_dir/README.md`` and ``out_dir/figures/*.png``.

    ``experiments`` maps experiment name → config (its ``variant`` selects the reported row);
    ``provenance`` holds global facts shown in the provenance block. Returns the index.html path.
    """
    out_dir = Path(out_dir)
    metrics = load_metrics(metrics_csv)
    reported = load_reported(reported_yaml)
    sections, notes = _paper_sections(summarise(metrics, experiments), reported)
    _pair_cld_baselines(sections, experiments or {})

    runs = find_runs(results_dir)
    for r in runs:
        r["metrics"] = _read_json(r["dir"] / "metrics.json")
        r["history"] = _read_history(r["dir"] / "history.csv")

    figures: dict[str, bytes] = {}  # relative path → PNG, written only once all are made
    fig_groups: list[dict] = []
    for exp, stage in dict.fromkeys((r["experiment"], r["stage"]) for r in runs):
        group = [r for r in runs if (r["experiment"], r["stage"]) == (exp, stage)]
        entry = {"experiment": exp, "stage": stage, "confusion": None, "loss": None}
        first = next((r for r in group if (r["metrics"] or {}).get("confusion")), None)
        if first is not None:
            rel = f"figures/confusion_{_safe(exp)}_{_safe(stage)}.png"
            figures[rel] = confusion_figure(first["metrics"]["confusion"], f"{exp} / {stage}, seed {first['seed']}")
            entry["confusion"] = rel
        histories = {r["seed"]: r["history"] for r in group if r["history"] is not None}
        if histories:
            png = loss_figure(histories, f"{exp} / {stage}: training losses")
            if png is not None:
                rel = f"figures/loss_{_safe(exp)}_{_safe(stage)}.png"
                figures[rel] = png
                entry["loss"] = rel
        if entry["confusion"] or entry["loss"]:
            fig_groups.append(entry)

    context = {
        "sections": sections, "notes": notes, "figures": fig_groups,
        "provenance": _provenance(runs, read_benchmarks(benchmarks_dir), provenance),
        "n_rows": len(metrics), "metrics_csv": str(metrics_csv), "reported_yaml": str(reported_yaml),
    }
    markdown = _env(False).get_template("README.md.j2").render(**context)
    html = _env(True).get_template("index.html.j2").render(**context)

    for rel, png in figures.items():
        with atomic_path(out_dir / rel) as tmp:
            tmp.write_bytes(png)
    # Figures of experiments that are gone would otherwise linger beside the new report.
    for old in (out_dir / "figures").glob("*.png") if (out_dir / "figures").is_dir() else []:
        if f"figures/{old.name}" not in figures and old.name.startswith(("confusion_", "loss_")):
            old.unlink()
    write_text_atomic(out_dir / "README.md", markdown)
    index = out_dir / "index.html"
    write_text_atomic(index, html)  # last: its presence means the report is complete
    return index
