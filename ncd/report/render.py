"""Render the results report: reproduced vs. reported tables, figures and provenance.

Everything is computed in memory first and written last (figures, README.md, then index.html),
each file through a temporary name and a rename: a failure part-way leaves no new index.html
and no half-written file. The parts live beside this module: :mod:`ncd.report.tables` (metrics,
reported numbers, protocols, per-paper tables), :mod:`ncd.report.figures` and
:mod:`ncd.report.provenance`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jinja2

from ncd.report.compare import cross_method
from ncd.report.figures import build_figures, confusion_figure, loss_columns, loss_figure, write_figures
from ncd.report.provenance import find_runs, provenance as provenance_block, read_benchmarks, read_runs
from ncd.report.shaped import AGREEMENT_RULE, pair_cld_baselines, paper_tables, table_csvs
from ncd.report.tables import load_metrics, load_protocols, load_reported, match_reported, papers, summarise
from ncd.utils import write_text_atomic

_TEMPLATES = Path(__file__).with_name("templates")
PROTOCOLS_FILE = "protocols.yaml"  # the default protocols, next to reported.yaml
TABLES = "tables"  # the report's tables as CSV, under the output folder (Snakemake's report shows them)

def _md_cell(v: Any) -> str:
    """Make a value safe inside a GitHub Markdown table cell."""
    return " ".join(str(v).split()).replace("|", "\\|")


def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)), autoescape=autoescape,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md"] = _md_cell
    return env


def _write_tables(folder: Path, tables: dict[str, str]) -> None:
    """The tables as CSV files (each atomically); CSV files no longer made are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():
        write_text_atomic(folder / name, text)
    for old in folder.glob("*.csv"):
        if old.name not in tables:
            old.unlink()


def _protocols(path: Path | None, reported_yaml: Path, reported: list[dict]) -> dict[str, str]:
    """The protocol texts: ``path``, else ``protocols.yaml`` next to reported.yaml if there is one."""
    if path is None:
        path = Path(reported_yaml).with_name(PROTOCOLS_FILE)
        if not path.is_file():
            return {}
    return load_protocols(path, known=[*papers(), *(r["paper"] for r in reported)])


def build_report(metrics_csv: Path, reported_yaml: Path, results_dir: Path, benchmarks_dir: Path,
                 out_dir: Path, experiments: dict[str, dict] | None = None,
                 provenance: dict | None = None, protocols: Path | None = None) -> Path:
    """Render ``out_dir/index.html``, ``out_dir/README.md``, ``out_dir/figures/*.png`` and
    ``out_dir/tables/*.csv`` (the scorecard, the tables across methods and each paper's table).

    ``experiments`` maps experiment name → config (its ``variant`` selects the reported row);
    ``provenance`` holds global facts shown in the provenance block; ``protocols`` is the YAML file
    of the texts printed above each paper's table (default: ``protocols.yaml`` next to
    ``reported_yaml``, if it exists). Returns the index.html path.
    """
    out_dir = Path(out_dir)
    metrics = load_metrics(metrics_csv)
    reported = load_reported(reported_yaml)
    summary = summarise(metrics, experiments)
    sections, scorecard, notes = paper_tables(summary, reported, _protocols(protocols, reported_yaml, reported),
                                              experiments=experiments)
    runs = read_runs(results_dir)
    benchmarks = read_benchmarks(benchmarks_dir)
    figures, fig_groups = build_figures(runs)  # relative path → PNG, written only once all are made
    compare = cross_method(summary, experiments, runs, benchmarks)
    tables = table_csvs(sections, scorecard, compare)
    context = {
        "sections": sections, "scorecard": scorecard, "agreement_rule": AGREEMENT_RULE, "notes": notes,
        "compare": compare, "figures": fig_groups, "tables": sorted(tables),
        "provenance": provenance_block(runs, benchmarks, provenance),
        "n_rows": len(metrics), "metrics_csv": str(metrics_csv), "reported_yaml": str(reported_yaml),
        "metrics_href": Path(os.path.relpath(Path(metrics_csv).resolve(), out_dir.resolve())).as_posix(),
    }
    markdown = _env(False).get_template("README.md.j2").render(**context)
    html = _env(True).get_template("index.html.j2").render(**context)

    write_figures(out_dir, figures)
    _write_tables(out_dir / TABLES, tables)
    write_text_atomic(out_dir / "README.md", markdown)
    index = out_dir / "index.html"
    write_text_atomic(index, html)  # last: its presence means the report is complete
    return index


__all__ = ["PROTOCOLS_FILE", "build_report", "confusion_figure", "cross_method", "find_runs", "load_metrics",
           "load_protocols", "load_reported", "loss_columns", "loss_figure", "match_reported", "pair_cld_baselines",
           "paper_tables", "read_benchmarks", "read_runs", "summarise"]
